"""Typed records for what the toolchain writes as JSON: finetune metrics, the verify report, the
provenance an exported or fused ONNX model carries. Each is a dataclass, written by one function and
read back by one (strict: exactly the record's fields, each of its type). The files keep the formats
they had; the engine record lives with the engine (``toolchain.trt.record``). Torch-free."""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from toolchain.core.jsonio import read_json, read_record, record_from_dict, write_json

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class FinetuneMetrics:
    """``<adapter>.metrics.json``: what one ``finetune`` did and measured."""

    method: str
    rank: int
    layer_selection: str
    layers: int
    trainable_params: int
    total_params: int
    trainable_fraction: float
    f1_before: float
    f1_after: float
    accuracy_before: float
    accuracy_after: float
    steps: int
    train_seconds: float
    training_path: str  # "lean" or "reference"
    batch_size: int
    memory_budget_mb: float | None
    peak_train_memory_mb: float | None
    peak_rss_mb: float
    target_subjects: list
    adapt_windows: int
    test_windows: int
    checkpoint: str
    train_config: dict
    adapter_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_metrics(path: PathLike, metrics: FinetuneMetrics) -> None:
    write_json(path, metrics.to_dict())


def read_metrics(path: PathLike) -> FinetuneMetrics:
    return read_record(FinetuneMetrics, path, "the finetune metrics file", "re-run toolchain finetune")


def metrics_from_dict(value: Any) -> FinetuneMetrics:
    return record_from_dict(FinetuneMetrics, value, "finetune metrics", "re-run toolchain finetune")


@dataclass(frozen=True)
class OutputErrors:
    """One output's errors against the reference, and the smallest tolerances that would pass."""

    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    min_passing_atol: float
    min_passing_rtol: float


@dataclass(frozen=True)
class Comparison:
    """One runner (the model, or the engine) judged against the reference at its own tolerances."""

    against: str
    atol: Any  # a float, or per-output {name: float} ("" keys the default)
    rtol: Any
    precision: str  # "fp32", "fp16", or "given" (an engine without a record, tolerances given)
    passed: bool
    outputs: dict[str, OutputErrors]


@dataclass(frozen=True)
class Saturation:
    """One activation quantizer of an INT8 model on real windows: the share of windows on which a value
    falls outside its range (``[-128, 127] * scale``, so it is clipped) and the largest value as a
    multiple of that range (``toolchain.saturation``)."""

    tensor: str
    scale: float
    windows_clipped: float
    max_over_range: float


@dataclass(frozen=True)
class Agreement:
    """A quantized model against its float reference on labelled real data: top-1 agreement and the
    task metric of both (``verify`` of an INT8 model)."""

    data: str
    split: str
    windows: int
    top1_agreement: float
    min_agreement: float
    f1_model: float
    f1_reference: float
    accuracy_model: float
    accuracy_reference: float
    passed: bool
    saturation: tuple[Saturation, ...] = ()  # the model's activations past their INT8 range, most often first
    coarse: tuple[Saturation, ...] = ()  # its activations that reach at most half their range, least used first
    # toolchain.flips: the agreement's Wilson 95% interval; the windows whose top-1 differs (count, and at most
    # flips.MAX_LISTED by index, the reference's most confident first, with the reference's top-2 margin on each);
    # the median margin of all windows; the share of windows at most as confident as the most confident flip
    interval: list[float] = field(default_factory=list)
    flipped: int = 0
    flipped_windows: list[int] = field(default_factory=list)
    flipped_margins: list[float] = field(default_factory=list)
    margin_median: float | None = None
    flipped_margin_rank: float | None = None


FLIP_FIELDS = ("interval", "flipped", "flipped_windows", "flipped_margins", "margin_median", "flipped_margin_rank")


@dataclass(frozen=True)
class VerifyReport:
    """``verify.json``: what was compared, on which inputs, and the verdict."""

    reference: str
    model: str
    engine: str | None
    iterations: int
    real_batches: int
    random_inputs: int
    comparisons: dict[str, Comparison]
    passed: bool
    inputs: str
    outputs: str
    agreement: Agreement | None = None  # an INT8 model against an FP32 reference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_verify_report(path: PathLike, report: VerifyReport) -> None:
    write_json(path, report.to_dict())


def read_verify_report(path: PathLike) -> VerifyReport:
    remedy = "re-run toolchain verify"
    raw = read_json(path, "the verify report", remedy)
    if isinstance(raw, dict) and isinstance(raw.get("comparisons"), dict):
        raw = {**raw, "comparisons": {k: _comparison(v, remedy) for k, v in raw["comparisons"].items()}}
    if isinstance(raw, dict):  # reports written before INT8 verification have no agreement
        agreement = raw.get("agreement")
        if isinstance(agreement, dict):  # written before saturation (or coarse ranges) was measured: none recorded
            lists = {key: _range_entries(agreement.get(key, []), key, remedy) for key in ("saturation", "coarse")}
            agreement = {**_flip_defaults(), **agreement, **lists}  # flips: measured since
        if agreement is not None:
            agreement = record_from_dict(Agreement, agreement, "a verify agreement", remedy)
        raw = {**raw, "agreement": agreement}
    return record_from_dict(VerifyReport, raw, "the verify report", remedy)


def _range_entries(value: Any, key: str, remedy: str) -> tuple[Saturation, ...]:
    entries = value if isinstance(value, list) else [value]  # one entry not in a list: refused below
    return tuple(record_from_dict(Saturation, c, f"a verify {key} entry", remedy) for c in entries)


def _flip_defaults() -> dict[str, Any]:
    """``Agreement``'s flip fields at their defaults: a report written before they were measured has none."""
    out: dict[str, Any] = {}
    for f in fields(Agreement):
        if f.name in FLIP_FIELDS:
            out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


def _comparison(value: Any, remedy: str) -> Comparison:
    if isinstance(value, dict) and isinstance(value.get("outputs"), dict):
        outputs = {k: record_from_dict(OutputErrors, v, "a verify output", remedy) for k, v in value["outputs"].items()}
        value = {**value, "outputs": outputs}
    return record_from_dict(Comparison, value, "a verify comparison", remedy)
