"""What the edge and the trainer must agree on, defined once: bundles and their manifests, the model's input
spec, the quarantine wire header, names, and the trust formats (Ed25519 signatures, TLS, CURVE keys).

torch-free: the edge imports it to read and verify, the trainer to write what the edge verifies.
"""
