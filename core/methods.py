"""The method registry: one torch-free spec per adaptation method.

Everything that differs between methods lives here and nowhere else: the tensors an adapter file
holds per layer (names and shapes), how the fused weight is computed in numpy, whether the method
can be fused at all, whether it takes a rank, its default learning rate, and whether the base
weights stay frozen (so the lean training path applies). The CLI, the adapter format, the fuse
pass and the torch injection all read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolchain.core.errors import ToolchainError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class MethodSpec:
    """What one adaptation method is, independent of torch.

    name: the CLI name. lr: default Adam learning rate. layer_kind: "tt" (LoRA-Edge cores),
    "lora" (A, B), "dora" (A, B, magnitude), "bottleneck" (adapter block) or "" (no per-layer
    tensors). fusable: its update can be written into the base model's weights. takes_rank: --rank
    means something for it. base_frozen: the pretrained conv weights get no gradient (the lean
    training path applies). implied_groups: extra parameter groups it always trains. optimizer:
    "adam" or "galore".
    """

    name: str
    summary: str
    lr: float
    layer_kind: str
    fusable: bool
    takes_rank: bool
    base_frozen: bool
    implied_groups: tuple[str, ...] = ()
    optimizer: str = "adam"  # "adam", or "galore": Adam with moments in a rank-r gradient projection

    @property
    def wraps_convs(self) -> bool:
        return self.layer_kind in ("tt", "lora", "dora")


REGISTRY: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(
            "lora-edge", "tensor-train LoRA: train ΔG1 of each conv's output-side TT core", 5e-3, "tt", True, True, True
        ),
        MethodSpec("lora", "conv LoRA (PEFT style): W + s·B·A per group", 5e-3, "lora", True, True, True),
        MethodSpec(
            "dora", "DoRA: magnitude · (W + ΔW) / ||W + ΔW|| per output channel", 5e-3, "dora", True, True, True
        ),
        MethodSpec(
            "adapter",
            "residual bottleneck after each block (adds layers; not fusable)",
            5e-3,
            "bottleneck",
            False,
            False,
            True,
        ),
        MethodSpec("full", "full fine-tuning of every parameter", 1e-3, "", True, False, False),
        MethodSpec(
            "galore",
            "full-rank weights, Adam moments in a rank-r projection of each gradient",
            1e-3,
            "",
            True,
            True,
            False,
            optimizer="galore",
        ),
        MethodSpec("head", "the classifier head only", 5e-3, "", True, False, True, ("head",)),
        MethodSpec("bitfit", "biases and BatchNorm affine only", 5e-3, "", True, False, True, ("bn", "bias")),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_METHOD = "lora-edge"


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; a ToolchainError listing the known methods otherwise."""
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ToolchainError("unknown adaptation method", seen=name, remedy=f"use one of {', '.join(METHODS)}")
    return spec


def tensor_names(method: str, layer: str, ranks: Sequence[int]) -> list[str]:
    """Names of one layer's tensors in an adapter file, in the order the layer modules use."""
    kind = get_method(method).layer_kind
    if kind == "tt":
        return [f"{layer}.delta_g1"] + [f"{layer}.core{k}" for k in range(2, len(ranks))]
    if kind in ("lora", "dora"):
        return [f"{layer}.lora_A", f"{layer}.lora_B"] + ([f"{layer}.magnitude"] if kind == "dora" else [])
    if kind == "bottleneck":
        return [f"{layer}.down.weight", f"{layer}.down.bias", f"{layer}.up.weight", f"{layer}.up.bias"]
    raise ToolchainError(
        "this method has no per-layer tensors", seen=method, remedy="record its trained tensors as extras"
    )


def expected_shapes(method: str, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
    """Shapes of one layer's tensors for a conv weight (C_out, C_in/g, k1[, k2]).

    lora-edge: ranks are the TT bonds (1, r1, ..., r_{d-1}, 1); ΔG1 is (C_out, r1) and core k
    (k = 2..d) is (r_{k-1}, n_k, r_k). lora/dora: ranks = (r,); A is (g·r, C_in/g, k...), B is
    (C_out, r), the DoRA magnitude (C_out,). adapter: ranks = (hidden,) on a block of C channels.
    """
    kind = get_method(method).layer_kind
    c_out, *rest = weight_shape
    if kind == "tt":
        if len(ranks) != len(weight_shape) + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise ToolchainError(
                "LoRA-Edge bond ranks must be (1, r1, ..., 1) with one more entry than the kernel has modes",
                seen=(tuple(ranks), weight_shape),
            )
        return [(c_out, ranks[1])] + [(ranks[k - 1], weight_shape[k - 1], ranks[k]) for k in range(2, len(ranks))]
    if kind in ("lora", "dora"):
        (r,) = _one_rank(method, ranks)
        out = [(groups * r, *rest), (c_out, r)]
        return [*out, (c_out,)] if kind == "dora" else out
    if kind == "bottleneck":
        (h,) = _one_rank(method, ranks)
        ones = (1,) * (len(weight_shape) - 2)
        return [(h, c_out, *ones), (h,), (c_out, h, *ones), (c_out,)]
    raise ToolchainError("this method has no per-layer tensors", seen=method)


def _one_rank(method: str, ranks: Sequence[int]) -> tuple[int]:
    if len(ranks) != 1:
        raise ToolchainError(f"{method} layers record exactly one rank", seen=tuple(ranks))
    return (int(ranks[0]),)


def delta_lora_edge(tensors: Sequence[np.ndarray], groups: int, scaling: float) -> np.ndarray:
    """ΔW of LoRA-Edge from (ΔG1, G2, ..., Gd): the kernels' reference contraction."""
    from toolchain.kernels.tt import delta_weight, suffix_kernel

    delta, *suffix = tensors
    return delta_weight(delta, suffix_kernel(suffix), scaling)


def delta_lora(tensors: Sequence[np.ndarray], groups: int, scaling: float) -> np.ndarray:
    """ΔW of conv LoRA from (A, B)."""
    from toolchain.kernels.lora import lora_delta

    return lora_delta(tensors[0], tensors[1], groups, scaling)


def check_rank(method: str, rank: int) -> None:
    """Refuse, before any work, a rank that no layer could use (only where --rank means something)."""
    if get_method(method).takes_rank and (isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1):
        raise ToolchainError(
            "--rank must be an integer >= 1", seen=rank, remedy="use --rank 1 or more (2, 4, 8 are usual)"
        )


def method_ranks(methods: Sequence[str], ranks: Sequence[int]) -> list[tuple[str, int]]:
    """(method, rank) for every method: each of ``ranks`` where --rank means something, else 0."""
    specs = [get_method(m) for m in methods]
    for s in specs:
        for r in ranks:
            check_rank(s.name, r)
    return [(s.name, r) for s in specs for r in (ranks if s.takes_rank else (0,))]


DeltaFn = Callable[[Sequence[np.ndarray], int, float], np.ndarray]
_DELTAS: dict[str, DeltaFn] = {"tt": delta_lora_edge, "lora": delta_lora}


def fused_weight(
    method: str,
    base: np.ndarray,
    tensors: Sequence[np.ndarray],
    groups: int,
    scaling: float,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """The weight that replaces ``base`` (C_out, C_in/g, k...) in the fused model, float32.

    ``scale``: per-output-channel BatchNorm fold factors already multiplied into ``base``
    (``toolchain export --fold-bn``); the update is applied to the unfolded weight and re-scaled.
    """
    spec = get_method(method)
    if not spec.fusable or not spec.wraps_convs:
        raise ToolchainError(
            f"{method} layers cannot be fused into Conv weights",
            seen=method,
            remedy="deploy the unfused export (toolchain export --adapter FILE without --fuse)",
        )
    bshape = (-1,) + (1,) * (base.ndim - 1)
    with np.errstate(over="ignore", invalid="ignore"):
        if spec.layer_kind == "dora":
            from toolchain.kernels.lora import dora_weight

            unfolded = base if scale is None else (base / scale.reshape(bshape)).astype(np.float32)
            out = dora_weight(unfolded, tensors[0], tensors[1], tensors[2], groups, scaling)
            out = out if scale is None else out * scale.reshape(bshape)
        else:
            delta = _DELTAS[spec.layer_kind](tensors, groups, scaling)
            if delta.shape != base.shape:
                raise ToolchainError("ΔW shape does not match the Conv weight", seen=(delta.shape, base.shape))
            out = base + (delta if scale is None else delta * scale.reshape(bshape))
    return np.asarray(out, dtype=np.float32)
