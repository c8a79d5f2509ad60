"""Shared fixtures: conv geometries, real data locations."""

from __future__ import annotations

from pathlib import Path

import pytest

HAPT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "HAPT"


@pytest.fixture
def hapt_dir() -> Path:
    if not (HAPT_DIR / "RawData" / "labels.txt").is_file():
        pytest.skip(f"HAPT raw data not found at {HAPT_DIR} (see its SOURCE.md)")
    return HAPT_DIR
