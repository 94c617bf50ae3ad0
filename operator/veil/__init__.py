"""Veil: a Kubernetes operator for confidential AI workloads."""

API_GROUP = "veil.dev"
API_VERSION = "v1alpha1"
__version__ = "0.1.0"
