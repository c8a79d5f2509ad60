"""The method registry: one torch-free spec per adaptation method, one kind object per layer kind.

A method (``MethodSpec``) says what is trained: its learning rate, whether the base stays frozen,
whether it takes a rank, its optimizer, the scale its layers use. A layer kind (``LayerKind``) says
how one adapted layer is stored and fused: its tensors' names and shapes in an adapter file and its
fused weight in numpy. The torch half of a kind (module factory, lean forward) is registered from
the training package (``toolchain.peft.kinds``). The CLI, the adapter format, the fuse pass and
the torch injection all read these objects; none of them branches on a method's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.kernels.lora import dora_weight, lora_delta
from toolchain.kernels.tt import delta_weight, suffix_kernel

Shape = tuple[int, ...]
_NO_FUSE = "deploy the unfused export (toolchain export --adapter FILE without --fuse)"


class LayerKind:
    """How one kind of adapted layer is stored and fused, without torch.

    name: the key the torch half registers under. wraps_convs: it replaces a conv (its update can be
    fused into that conv's weight); False for kinds that add layers. per_layer: an adapter file of
    this kind holds per-layer tensors (False: extras only).
    """

    name = ""
    wraps_convs = False
    per_layer = False

    def tensor_names(self, layer: str, ranks: Sequence[int]) -> list[str]:
        """Names of one layer's tensors in an adapter file, in the order the layer modules use."""
        raise ToolchainError(
            "this method has no per-layer tensors",
            seen=self.name or "none",
            remedy="record its trained tensors as extras",
        )

    def expected_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        """Shapes of one layer's tensors for a conv weight (C_out, C_in/g, k1[, k2])."""
        raise ToolchainError("this method has no per-layer tensors", seen=self.name or "none")

    def record_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        """Shapes of a layer record's tensors from its geometry's weight shape and groups."""
        return self.expected_shapes(weight_shape, groups, ranks)

    def fused_weight(
        self, base: np.ndarray, tensors: Sequence[np.ndarray], groups: int, scaling: float, scale: np.ndarray | None
    ) -> np.ndarray:
        """The weight that replaces ``base`` (float64 or float32 arithmetic; the caller casts)."""
        raise ToolchainError(
            f"{self.name or 'these'} layers cannot be fused into Conv weights", seen=self.name, remedy=_NO_FUSE
        )

    def check_fold_scale(self, layer: str, scale: np.ndarray) -> None:
        """Refuse a BatchNorm fold scale this kind cannot undo (only DoRA needs the unfolded weight)."""


class _DeltaKind(LayerKind):
    """A kind whose fused weight is base + ΔW (ΔW re-scaled where a BatchNorm was folded in)."""

    wraps_convs = True
    per_layer = True

    def delta(self, tensors: Sequence[np.ndarray], groups: int, scaling: float) -> np.ndarray:
        raise NotImplementedError

    def fused_weight(
        self, base: np.ndarray, tensors: Sequence[np.ndarray], groups: int, scaling: float, scale: np.ndarray | None
    ) -> np.ndarray:
        delta = self.delta(tensors, groups, scaling)
        if delta.shape != base.shape:
            raise ToolchainError("ΔW shape does not match the Conv weight", seen=(delta.shape, base.shape))
        return base + (delta if scale is None else delta * scale.reshape(_per_channel(base)))


class TTKind(_DeltaKind):
    """LoRA-Edge: ΔG1 (C_out, r1) and the frozen cores G2..Gd; ΔW = s · ΔG1 ×₁ (G2 ⋯ Gd)."""

    name = "tt"

    def tensor_names(self, layer: str, ranks: Sequence[int]) -> list[str]:
        return [f"{layer}.delta_g1"] + [f"{layer}.core{k}" for k in range(2, len(ranks))]

    def expected_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        """ranks are the TT bonds (1, r1, ..., r_{d-1}, 1); ΔG1 is (C_out, r1), core k is (r_{k-1}, n_k, r_k)."""
        if len(ranks) != len(weight_shape) + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise ToolchainError(
                "LoRA-Edge bond ranks must be (1, r1, ..., 1) with one more entry than the kernel has modes",
                seen=(tuple(ranks), weight_shape),
            )
        c_out = weight_shape[0]
        return [(c_out, ranks[1])] + [(ranks[k - 1], weight_shape[k - 1], ranks[k]) for k in range(2, len(ranks))]

    def delta(self, tensors: Sequence[np.ndarray], groups: int, scaling: float) -> np.ndarray:
        first, *suffix = tensors
        return delta_weight(first, suffix_kernel(suffix), scaling)


class LoRAKind(_DeltaKind):
    """Conv LoRA: A (g·r, C_in/g, k...) and B (C_out, r); ΔW = s · B·A per group."""

    name = "lora"

    def tensor_names(self, layer: str, ranks: Sequence[int]) -> list[str]:
        return [f"{layer}.lora_A", f"{layer}.lora_B"]

    def expected_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        (r,) = _one_rank(self.name, ranks)
        c_out, *rest = weight_shape
        return [(groups * r, *rest), (c_out, r)]

    def delta(self, tensors: Sequence[np.ndarray], groups: int, scaling: float) -> np.ndarray:
        return lora_delta(tensors[0], tensors[1], groups, scaling)


class DoRAKind(LoRAKind):
    """DoRA: LoRA's A and B plus a magnitude (C_out,); W' = m · (W + ΔW) / ||W + ΔW||."""

    name = "dora"

    def tensor_names(self, layer: str, ranks: Sequence[int]) -> list[str]:
        return [*super().tensor_names(layer, ranks), f"{layer}.magnitude"]

    def expected_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        return [*super().expected_shapes(weight_shape, groups, ranks), (weight_shape[0],)]

    def fused_weight(
        self, base: np.ndarray, tensors: Sequence[np.ndarray], groups: int, scaling: float, scale: np.ndarray | None
    ) -> np.ndarray:
        bshape = _per_channel(base)
        unfolded = base if scale is None else (base / scale.reshape(bshape)).astype(np.float32)
        out = dora_weight(unfolded, tensors[0], tensors[1], tensors[2], groups, scaling)
        return out if scale is None else out * scale.reshape(bshape)

    def check_fold_scale(self, layer: str, scale: np.ndarray) -> None:
        if np.any(scale == 0):
            raise ToolchainError(
                f"layer {layer}: a BatchNorm fold scale is 0, so the unfolded weight cannot be recovered for DoRA",
                seen=int(np.sum(scale == 0)),
                remedy="export without --fold-bn",
            )


class BottleneckKind(LayerKind):
    """A residual bottleneck after a block of C channels: down (h, C, 1...), up (C, h, 1...); adds layers."""

    name = "bottleneck"
    per_layer = True

    def tensor_names(self, layer: str, ranks: Sequence[int]) -> list[str]:
        return [f"{layer}.down.weight", f"{layer}.down.bias", f"{layer}.up.weight", f"{layer}.up.bias"]

    def expected_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        """ranks = (hidden,); ``weight_shape`` is (C, C, 1...) for a block of C channels."""
        (h,) = _one_rank("adapter", ranks)
        c_out = weight_shape[0]
        ones = (1,) * (len(weight_shape) - 2)
        return [(h, c_out, *ones), (h,), (c_out, h, *ones), (c_out,)]

    def record_shapes(self, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
        c = weight_shape[0]
        return self.expected_shapes((c, c, *weight_shape[2:]), 1, ranks)


NO_LAYERS = LayerKind()
KINDS: dict[str, LayerKind] = {k.name: k for k in (TTKind(), LoRAKind(), DoRAKind(), BottleneckKind())}


def _same(scaling: float, rank: int) -> float:
    return scaling


def _sqrt_rank(scaling: float, rank: int) -> float:
    """rsLoRA (Kalajdzievski, 2023): alpha / sqrt(r) with alpha = scaling · r, so s = scaling · sqrt(r)."""
    return scaling * math.sqrt(rank)


@dataclass(frozen=True)
class MethodSpec:
    """What one adaptation method is, independent of torch.

    name: the CLI name. lr: default Adam learning rate. kind: its layer kind (``KINDS``), or
    ``NO_LAYERS``. fusable: its update can be written into the base model's weights. takes_rank:
    --rank means something for it. base_frozen: the pretrained conv weights get no gradient (the
    lean training path applies). implied_groups: extra parameter groups it always trains.
    optimizer: "adam" or "galore". layer_scale: (--scaling, rank) -> the scale s its layers apply
    to ΔW (lora/dora: alpha / r with alpha = scaling · r, so s = scaling).
    """

    name: str
    summary: str
    lr: float
    kind: LayerKind
    fusable: bool
    takes_rank: bool
    base_frozen: bool
    implied_groups: tuple[str, ...] = ()
    optimizer: str = "adam"  # "adam", or "galore": Adam with moments in a rank-r gradient projection
    layer_scale: Callable[[float, int], float] = field(default=_same, compare=False)

    @property
    def layer_kind(self) -> str:
        """The kind's name ("" for methods without layers)."""
        return self.kind.name

    @property
    def wraps_convs(self) -> bool:
        return self.kind.wraps_convs


REGISTRY: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(
            "lora-edge",
            "tensor-train LoRA: train ΔG1 of each conv's output-side TT core",
            5e-3,
            KINDS["tt"],
            True,
            True,
            True,
        ),
        MethodSpec("lora", "conv LoRA (PEFT style): W + s·B·A per group", 5e-3, KINDS["lora"], True, True, True),
        MethodSpec(
            "rslora",
            "rank-stabilised conv LoRA: W + s·B·A, s = alpha / sqrt(r)",
            5e-3,
            KINDS["lora"],
            True,
            True,
            True,
            layer_scale=_sqrt_rank,
        ),
        MethodSpec(
            "dora", "DoRA: magnitude · (W + ΔW) / ||W + ΔW|| per output channel", 5e-3, KINDS["dora"], True, True, True
        ),
        MethodSpec(
            "adapter",
            "residual bottleneck after each block (adds layers; not fusable)",
            5e-3,
            KINDS["bottleneck"],
            False,
            False,
            True,
        ),
        MethodSpec("full", "full fine-tuning of every parameter", 1e-3, NO_LAYERS, True, False, False),
        MethodSpec(
            "galore",
            "full-rank weights, Adam moments in a rank-r projection of each gradient",
            1e-3,
            NO_LAYERS,
            True,
            True,
            False,
            optimizer="galore",
        ),
        MethodSpec("head", "the classifier head only", 5e-3, NO_LAYERS, True, False, True, ("head",)),
        MethodSpec("bitfit", "biases and BatchNorm affine only", 5e-3, NO_LAYERS, True, False, True, ("bn", "bias")),
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
    return get_method(method).kind.tensor_names(layer, ranks)


def expected_shapes(method: str, weight_shape: Shape, groups: int, ranks: Sequence[int]) -> list[Shape]:
    """Shapes of one layer's tensors for a conv weight (C_out, C_in/g, k1[, k2]) (see each kind)."""
    return get_method(method).kind.expected_shapes(weight_shape, groups, ranks)


def _one_rank(method: str, ranks: Sequence[int]) -> tuple[int]:
    if len(ranks) != 1:
        raise ToolchainError(f"{method} layers record exactly one rank", seen=tuple(ranks))
    return (int(ranks[0]),)


def _per_channel(base: np.ndarray) -> tuple[int, ...]:
    return (-1,) + (1,) * (base.ndim - 1)


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
        raise ToolchainError(f"{method} layers cannot be fused into Conv weights", seen=method, remedy=_NO_FUSE)
    with np.errstate(over="ignore", invalid="ignore"):
        out = spec.kind.fused_weight(base, tensors, groups, scaling, scale)
    return np.asarray(out, dtype=np.float32)
