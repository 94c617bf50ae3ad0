"""Programs that run inside the TEE: sealed models, key release, attestation checks, inference.

Submodules are imported on demand (onnxruntime and aiohttp are heavy); nothing is re-exported here.
"""
