"""Where an INT8 model's activations leave their calibrated range: for every activation
QuantizeLinear, the share of real windows on which some value rounds past ``[-128, 127]`` (and is
clipped), and how far past the range the largest one reaches; and which activations stay far inside
it (``coarse``: the largest value on every window reaches at most half the range, so the step is at
least twice what these windows need).

An adapter fused into a quantized base keeps the base's activation scales (docs/INT8.md); where it
makes activations grow, the deployed model clips them. This is what ``verify`` of an INT8 model
reports beside its agreement, so a failed gate says whether ``fuse --recalibrate`` is the remedy.
Needs onnxruntime; no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.records import Saturation

QMIN, QMAX = -128, 127  # signed INT8 with zero point 0: the layout toolchain quantize writes
# A quantizer clipped on this share of windows or more is out of calibration, not at its tail: max
# calibration on representative windows leaves few windows past the range (mobilenet1d's quantized base on
# its source windows: 0.5% at most), while an adapter that grew the activations clips most of them (fused
# into that base: 100% of the target windows at the last conv; recalibrated: 1.5%). docs/INT8.md.
HEAVY = 0.05
# An activation whose largest value on the windows reaches at most this share of its range uses at most
# half its codes. On mobilenet1d the model input's scale, set by spikes in the source subjects, reaches
# 0.33x on the target test windows, where every other activation reaches 0.8x or more; that one quantizer
# alone costs as much agreement as all 23 (docs/BENCHMARKS.md, "where the activation loss is").
COARSE = 0.5


def _quantizers(model: str | Path) -> tuple[bytes, list[str], list[float]]:
    """The model with every activation quantizer's input as an extra output, those inputs' names and
    their scales."""
    import onnx

    from toolchain.graphs.onnx_io import load_onnx
    from toolchain.graphs.qdq import activation_quantizers
    from toolchain.graphs.weights import index_weights

    proto = load_onnx(str(model))
    weights = index_weights(proto.graph)
    quantizers = activation_quantizers(proto.graph, weights)
    names = list(dict.fromkeys(q.input[0] for q in quantizers))  # one tensor may feed two quantizers
    scale = {q.input[0]: float(weights[q.input[1]].values().reshape(-1)[0]) for q in quantizers}
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    return proto.SerializeToString(), names, [scale[n] for n in names]


def _excess(values: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest |value| as a multiple of the range's bound on its side, and whether some value
    is clipped: QuantizeLinear rounds first, so a value is clipped only where it rounds past [-128, 127]
    (a ReLU6 output of 6 at the scale 6/127 is not, though float rounding may put it a hair above 1.0x)."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    high, low = flat.max(axis=1) / scale, flat.min(axis=1) / scale
    clipped = (high > QMAX + 0.5) | (low < QMIN - 0.5)
    return np.maximum(high / QMAX, low / QMIN), clipped


def _measure(model: str | Path, x: np.ndarray) -> list[Saturation]:
    """Every activation quantizer of ``model`` on the windows ``x`` (N, ...): the share of windows with a
    clipped value and the largest value over all of them as a multiple of the range; batched as
    ``verify.model_batches`` (padding rows not counted)."""
    import onnxruntime as ort

    from toolchain.verify import model_batches

    if not len(x):
        return []
    serialized, names, scales = _quantizers(model)
    if not names:
        return []
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as written
    session = ort.InferenceSession(serialized, opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    excess: list[list[np.ndarray]] = [[] for _ in names]
    flags: list[list[np.ndarray]] = [[] for _ in names]
    for chunk, real in model_batches(x, inp.shape[0]):
        for j, value in enumerate(session.run(names, {inp.name: chunk})):
            e, c = _excess(np.asarray(value)[:real], scales[j])
            excess[j].append(e)
            flags[j].append(c)
    return [
        Saturation(
            tensor=name,
            scale=scale,
            windows_clipped=float(np.mean(np.concatenate(c_parts))),
            max_over_range=float(np.concatenate(e_parts).max()),
        )
        for name, scale, e_parts, c_parts in zip(names, scales, excess, flags, strict=True)
    ]


def ranges(model: str | Path, x: np.ndarray) -> tuple[tuple[Saturation, ...], tuple[Saturation, ...]]:
    """(``saturation``, ``coarse``) of ``model`` on ``x`` from one run."""
    entries = _measure(model, x)
    clipped = [s for s in entries if s.windows_clipped > 0]
    inside = [s for s in entries if s.max_over_range <= COARSE]
    return (
        tuple(sorted(clipped, key=lambda s: (-s.windows_clipped, -s.max_over_range, s.tensor))),
        tuple(sorted(inside, key=lambda s: (s.max_over_range, s.tensor))),
    )


def saturation(model: str | Path, x: np.ndarray) -> tuple[Saturation, ...]:
    """For an explicitly quantized ``model`` on the windows ``x`` (N, ...): one entry per activation
    quantizer whose range is exceeded on at least one window, most often clipped first."""
    return ranges(model, x)[0]


def coarse(model: str | Path, x: np.ndarray) -> tuple[Saturation, ...]:
    """One entry per activation quantizer whose largest value on all of ``x`` reaches at most ``COARSE``
    of its range (none clipped, then), the least used first."""
    return ranges(model, x)[1]


def heavy(entries: tuple[Saturation, ...]) -> bool:
    """Whether some activation is clipped on at least ``HEAVY`` of the windows."""
    return any(s.windows_clipped >= HEAVY for s in entries)


def summary(entries: tuple[Saturation, ...], top: int = 3) -> str:
    """One line: the most often clipped activations, or that none is."""
    if not entries:
        return "no activation leaves its INT8 range on these windows"
    worst = ", ".join(
        f"{s.tensor} on {100 * s.windows_clipped:.1f}% (up to {s.max_over_range:.2f}x)" for s in entries[:top]
    )
    more = f" and {len(entries) - top} more" if len(entries) > top else ""
    return f"{len(entries)} activations clipped past their INT8 range on some windows: {worst}{more}"


def coarse_summary(entries: tuple[Saturation, ...], top: int = 3) -> str:
    """One line: the activations that use at most half their range, or that none does."""
    if not entries:
        return f"every activation reaches more than {COARSE:.0%} of its INT8 range on these windows"
    worst = ", ".join(f"{s.tensor} ({s.max_over_range:.2f}x)" for s in entries[:top])
    more = f" and {len(entries) - top} more" if len(entries) > top else ""
    one = len(entries) == 1
    return (
        f"{len(entries)} {'activation reaches' if one else 'activations reach'} at most {COARSE:.0%} of "
        f"{'its' if one else 'their'} INT8 range on these windows (a step at least twice what "
        f"{'it needs' if one else 'they need'}): {worst}{more}"
    )
