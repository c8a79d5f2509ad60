"""Every export checked against the PyTorch module it came from, in ONNX Runtime.

``verify`` compares a fused model with an unfused one written by the same exporter, so an exporter
bug would pass it. This check runs the written ONNX model in ONNX Runtime (CPU, one thread) and the
module in PyTorch on the same inputs (real windows or images where given, plus seeded random ones)
and refuses a model whose outputs differ beyond float32 tolerance: |onnx - torch| <= ATOL + RTOL *
max|torch| per output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

if TYPE_CHECKING:
    from torch import nn

EXPORT_ATOL = 1e-4
EXPORT_RTOL = 1e-4
RANDOM_INPUTS = 4
REAL_INPUTS = 8
METADATA_KEY = "toolchain.export_check"


@dataclass(frozen=True)
class ExportCheck:
    """ONNX Runtime against PyTorch on the same inputs."""

    exporter: str
    torch_version: str
    real_inputs: int
    random_inputs: int
    max_abs: dict[str, float]  # per output
    bound: dict[str, float]  # ATOL + RTOL * max|torch output|
    passed: bool

    @property
    def worst(self) -> tuple[str, float, float]:
        """(output, max abs error, its bound) of the output closest to failing."""
        name = max(self.max_abs, key=lambda k: self.max_abs[k] / self.bound[k])
        return name, self.max_abs[name], self.bound[name]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "atol": EXPORT_ATOL, "rtol": EXPORT_RTOL}, sort_keys=True)

    def line(self) -> str:
        name, err, bound = self.worst
        return (
            f"ONNX Runtime vs PyTorch ({self.exporter} exporter, {self.real_inputs} real + "
            f"{self.random_inputs} random inputs): output {name} max abs {err:.3g} (bound {bound:.3g})"
        )


def check_inputs(batch: int, shape: tuple[int, ...], real: np.ndarray | None = None, seed: int = 0) -> list[np.ndarray]:
    """Up to REAL_INPUTS batches spread over ``real`` (N, *shape), then RANDOM_INPUTS seeded random
    batches at the real data's scale (1 without real data)."""
    from toolchain.feeds import sample_batches

    return sample_batches(batch, shape, real, REAL_INPUTS, RANDOM_INPUTS, seed)


def against_torch(
    model: nn.Module, proto: onnx.ModelProto, feeds: list[np.ndarray], exporter: str, real: int
) -> ExportCheck:
    """Run ``proto`` in ONNX Runtime and ``model`` in PyTorch on ``feeds``; compare every output."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    errors = dict.fromkeys(names, 0.0)
    peaks = dict.fromkeys(names, 0.0)
    model = model.eval()
    for x in feeds:
        got = session.run(None, {in_name: x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        refs = [r.detach().cpu().numpy() for r in (ref if isinstance(ref, tuple | list) else (ref,))]
        if len(refs) != len(got):
            raise ValueError(f"the ONNX model has {len(got)} outputs, the module {len(refs)}")
        for name, a, b in zip(names, got, refs, strict=True):
            if a.shape != b.shape:
                raise ValueError(f"output {name} has shape {list(a.shape)} in ONNX, {list(b.shape)} in PyTorch")
            error, peak = output_error(a, b)
            errors[name] = max(errors[name], error)
            peaks[name] = max(peaks[name], peak)
    bound = {k: EXPORT_ATOL + EXPORT_RTOL * peaks[k] for k in names}
    passed = all(errors[k] <= bound[k] for k in names)
    return ExportCheck(exporter, str(torch.__version__), real, len(feeds) - real, errors, bound, passed)


def output_error(onnx_out: np.ndarray, torch_out: np.ndarray) -> tuple[float, float]:
    """(max abs error, peak |torch| over its finite values) of one output.

    Non-finite values must match exactly: the same positions, NaN for NaN and an infinity of the same
    sign; any other non-finite value on either side is an infinite error (``max(0.0, nan)`` would hide
    a NaN, and an infinite peak would make the bound infinite). The finite rest is compared as usual,
    so one masked (-inf) logit cannot hide an error on the others."""
    a, b = onnx_out.astype(np.float64), torch_out.astype(np.float64)
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    same_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    if not np.array_equal(~finite_a, same_nan | same_inf) or not np.array_equal(~finite_b, same_nan | same_inf):
        return float("inf"), _peak(b[finite_b])
    both = finite_a & finite_b
    diff = np.abs(a[both] - b[both])
    return (float(diff.max()) if diff.size else 0.0), _peak(b[finite_b])


def _peak(values: np.ndarray) -> float:
    return float(np.abs(values).max()) if values.size else 0.0


def record(proto: onnx.ModelProto, check: ExportCheck) -> None:
    """Write the check into the model's metadata_props (replacing an earlier one)."""
    keep = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    proto.metadata_props.add(key=METADATA_KEY, value=check.to_json())


def read(meta: dict[str, str]) -> dict[str, Any] | None:
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
