"""Layer 1, runtime: runs a model over its KV cache and samples from its logits. Knows nothing of
speculation, requests or gRPC."""
