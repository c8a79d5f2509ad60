"""ONNX graph passes for the deployment stage. No torch import anywhere in this package."""

from graphs.fuse import fuse_adapter, fuse_files
from graphs.onnx_io import load_onnx, save_onnx

__all__ = ["fuse_adapter", "fuse_files", "load_onnx", "save_onnx"]
