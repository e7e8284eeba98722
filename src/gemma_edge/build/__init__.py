"""The host's build steps: export, quantize, lower, and token parity against FP32."""
