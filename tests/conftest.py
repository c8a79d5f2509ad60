"""Shared fixtures: conv geometries, real data locations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_shadowed_distributions() -> None:
    """`python -m pytest` and pytest's rootdir insertion put the repository root first on sys.path, where
    its kernels/ (toolchain.kernels's source) shadows PyPI's `kernels`, which transformers imports when it
    is installed. Each root folder whose name an installed distribution also provides is imported once
    from the installed distribution, with the root off sys.path; everything else still resolves to this
    tree first."""
    import importlib
    import importlib.metadata

    provided = importlib.metadata.packages_distributions()
    names = [d.name for d in ROOT.iterdir() if d.is_dir() and d.name in provided and d.name not in sys.modules]
    if not names:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or ".")) != ROOT]
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # a broken optional install: whoever needs it reports it
                sys.modules.pop(name, None)
    finally:
        sys.path[:] = saved


_import_shadowed_distributions()

HAPT_DIR = ROOT.parent / "shared" / "data" / "HAPT"


@pytest.fixture
def hapt_dir() -> Path:
    if not (HAPT_DIR / "RawData" / "labels.txt").is_file():
        pytest.skip(f"HAPT raw data not found at {HAPT_DIR} (see its SOURCE.md)")
    return HAPT_DIR
