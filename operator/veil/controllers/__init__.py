"""Thin kopf handlers: read the object, call the domain, write status."""
