"""Lumen VLM: FastVLM on ONNX Runtime, served over the Lumen gRPC inference protocol."""

__version__ = "0.1.0"
