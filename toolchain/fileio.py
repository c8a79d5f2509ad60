"""Output files that appear whole or not at all, and the rules about where outputs may go."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from toolchain.errors import ToolchainError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str] | None] = (), *, force: bool = False) -> Path:
    """Refuse an output that is one of the inputs, or that exists when ``force`` is False."""
    target = Path(out)
    for src in inputs:
        if src is not None and target.resolve() == Path(src).resolve():
            raise ToolchainError("an output path must not be one of the inputs", seen=str(target), remedy="choose another output path")
    if target.exists() and not force:
        raise ToolchainError("the output exists and would be replaced", seen=str(target), remedy="pass --force to replace it, or choose another path")
    if target.exists() and target.is_dir():
        raise ToolchainError("the output path is a directory", seen=str(target), remedy="name a file")
    if not target.parent.exists():
        raise ToolchainError("the output's folder does not exist", seen=str(target.parent), remedy="create it first")
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place.

    On any exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` through ``atomic_path``."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
