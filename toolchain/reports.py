"""Writing report files: CSV tables and matplotlib figures, each written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolchain.core.fileio import write_bytes_atomic


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` as CSV with ``columns`` (other keys left out, missing ones empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
