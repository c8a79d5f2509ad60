"""ONNX graph passes for the deployment stage. No torch import anywhere in this package."""

from toolchain.graphs.diff import diff_models
from toolchain.graphs.fuse import fuse_files, fuse_model
from toolchain.graphs.onnx_io import load_onnx, save_onnx

__all__ = ["diff_models", "fuse_files", "fuse_model", "load_onnx", "save_onnx"]
