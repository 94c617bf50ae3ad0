"""Pure builders: a spec in, Kubernetes manifests (plain dicts) out. No I/O."""
