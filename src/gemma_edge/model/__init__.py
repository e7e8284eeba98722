"""The model: Gemma 4's decoder with its KV cache, checkpoints and the hub, the demo model and
E2B-shaped random models."""
