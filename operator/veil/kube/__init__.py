"""Talking to the Kubernetes API: one client, idempotent apply, status writes."""
