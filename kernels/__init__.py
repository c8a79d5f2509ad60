"""Pure numpy tensor math for LoRA-Edge: TT-SVD of conv kernels, core contraction, reference ΔW."""

from toolchain.kernels.digest import weight_sha256
from toolchain.kernels.lora import channel_norm, dora_weight, lora_delta
from toolchain.kernels.tt import (
    delta_weight,
    suffix_kernel,
    tt_ranks,
    tt_reconstruct,
    tt_svd,
    validate_cores,
)

__all__ = [
    "channel_norm",
    "delta_weight",
    "dora_weight",
    "lora_delta",
    "suffix_kernel",
    "tt_ranks",
    "tt_reconstruct",
    "tt_svd",
    "validate_cores",
    "weight_sha256",
]
