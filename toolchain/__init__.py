"""toolchain: LoRA-Edge (tensor-train LoRA) adaptation of edge CNNs, fused into ONNX and TensorRT.

Importing this package imports neither torch nor onnxruntime: the graph stage runs on a Jetson
with numpy, onnx and safetensors only. The Python API (``toolchain.api``) loads torch when
its training functions are called.
"""

from toolchain.core.errors import ToolchainError
from toolchain.core.version import package_version

__version__ = package_version()
__all__ = ["ToolchainError", "__version__"]
