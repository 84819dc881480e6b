"""gemma4-export: Gemma 4 checkpoints to GGUF, ONNX and MLX, quantized with Gemma 4 rules and validated in each runtime."""

__version__ = "0.1.0"
