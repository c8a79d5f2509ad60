"""Typed records for what the toolchain writes as JSON: finetune metrics, the verify report, the
provenance an exported or fused ONNX model carries. Each is a dataclass, written by one function and
read back by one (strict: exactly the record's fields, each of its type). The files keep the formats
they had; the engine record lives with the engine (``toolchain.trt.record``). Torch-free."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from toolchain.core.jsonio import read_record, record_from_dict, write_json

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
