"""Output files that appear whole or not at all, and the rules about where outputs may go.

Without ``force`` an output is created exclusively: if another process made the same path in the
meantime, the final step (a hard link) fails and nothing is replaced. With ``force`` the final
step is an atomic rename over the old file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import signal
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from toolchain.core.errors import ToolchainError

PathLike = str | os.PathLike[str]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_regular_file(path: Path, limit: int, *, what: str, remedy: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; FIFOs, devices and folders are refused unread."""
    try:
        st = path.stat()
    except OSError as err:
        raise ToolchainError(f"{what} cannot be read", seen=f"{path}: {err.strerror or err}", remedy=remedy) from None
    if not stat.S_ISREG(st.st_mode):
        raise ToolchainError(f"{what} is not a regular file", seen=str(path), remedy=remedy)
    if st.st_size > limit:
        raise ToolchainError(f"{what} is larger than {limit >> 20} MiB", seen=st.st_size, remedy=remedy)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ToolchainError(
            f"{what} cannot be read", seen=f"{path}: {err.strerror or err}", remedy="check its permissions"
        ) from None


def check_output(
    out: PathLike, inputs: Sequence[PathLike | None] = (), *, force: bool = False, related: Iterable[PathLike] = ()
) -> Path:
    """Refuse an output that is an input (or a file an input depends on, ``related``), that names a
    folder, or that exists when ``force`` is False."""
    text = os.fspath(out)
    if not text or text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise ToolchainError(
            "an output path must name a file, not a folder",
            seen=text or "(empty)",
            remedy="add a file name, e.g. out/model.onnx",
        )
    target = Path(text)
    for src in [*inputs, *related]:
        if src is not None and _same_file(target, Path(src)):
            raise ToolchainError(
                "an output path must not be one of the inputs or a file they use",
                seen=str(target),
                remedy="choose another output path",
            )
    if len(target.name.encode()) > 200:
        raise ToolchainError(
            "the output file name is too long (more than 200 bytes)",
            seen=target.name[:60] + "...",
            remedy="choose a shorter name",
        )
    if target.is_dir():
        raise ToolchainError("the output path is a folder", seen=str(target), remedy="name a file inside it")
    if (target.exists() or target.is_symlink()) and not force:
        raise ToolchainError(
            "the output exists and would be replaced",
            seen=str(target),
            remedy="pass --force to replace it, or choose another path",
        )
    if not target.parent.is_dir():
        raise ToolchainError("the output's folder does not exist", seen=str(target.parent), remedy="create it first")
    if not os.access(target.parent, os.W_OK):
        raise ToolchainError(
            "the output's folder is not writable", seen=str(target.parent), remedy="choose a folder you can write to"
        )
    return target


def check_distinct(outputs: dict[str, PathLike], inputs: dict[str, PathLike | None]) -> None:
    """Refuse a command's outputs (role -> path) where one is an input or another output: a
    ``--timing-cache`` naming the model would replace the model, one naming ``-o`` the engine.
    Roles name the options, so the message says which two collide."""
    outs = list(outputs.items())
    for i, (role, out) in enumerate(outs):
        others = [*inputs.items(), *outs[:i]]
        for other_role, other in others:
            if other is not None and _same_file(Path(out), Path(other)):
                raise ToolchainError(
                    f"{role} must not be the same file as {other_role}",
                    seen=os.fspath(out),
                    remedy=f"choose another path for {role}",
                )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(target: PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and move it into place.

    ``force`` False: the move fails if ``target`` exists by then (exclusive create), so two runs
    racing for one new path cannot both succeed. On any exception, SIGINT and SIGTERM included
    (the CLI turns SIGTERM into an exception), the temporary file is removed and ``target`` is
    left as it was.
    """
    target = Path(target)
    tmp_path = _partial_name(target)  # named before it exists: a signal at any point below finds it to remove
    try:
        _create_partial(target, tmp_path)
        yield tmp_path
        _publish_all([target], [tmp_path], force)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise ToolchainError(
            "cannot write the output",
            seen=f"{target}: {err.strerror or err}",
            remedy="check free space and permissions",
        ) from None
    except _NotCreated:
        raise  # nothing of ours to remove (on a name clash the file is someone else's)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


class _NotCreated(ToolchainError):
    """The temporary output could not be created."""


def _partial_name(target: Path) -> Path:
    return target.parent / f".{target.name[:100]}.{secrets.token_hex(6)}.partial"


def _create_partial(target: Path, path: Path) -> None:
    """Create ``path`` exclusively, 0600 (its name is 48 random bits: a clash is refused, not retried)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise _NotCreated(
            "cannot create the output",
            seen=f"{target}: {err.strerror or err}",
            remedy="check that its folder exists and is writable",
        ) from None


def _publish(tmp: Path, target: Path, force: bool) -> None:
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails with EEXIST when someone else created target meanwhile
    except FileExistsError:
        raise ToolchainError(
            "the output appeared while this command ran; it was not replaced",
            seen=str(target),
            remedy="pass --force to replace it, or choose another path",
        ) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # no hard links here
        os.close(fd)
        os.replace(tmp, target)
        return
    tmp.unlink()


# Called (no arguments) right before ``atomic_path`` or ``atomic_paths`` moves its files into place; one
# that raises stops the publication, and the staged files are removed. The CLI registers one for a
# deferred SIGTERM.
BEFORE_PUBLISH: list[Callable[[], None]] = []


@contextlib.contextmanager
def atomic_paths(targets: Sequence[PathLike], *, force: bool = True) -> Iterator[list[Path]]:
    """``atomic_path`` for several files that must appear together: yield a temporary path for each;
    on success move them all into place with SIGINT and SIGTERM held back (blocked, then delivered
    once every file is in place), so an interruption leaves all of them or none."""
    paths = [Path(t) for t in targets]
    tmps = [_partial_name(t) for t in paths]
    try:
        for target, tmp in zip(paths, tmps, strict=True):
            _create_partial(target, tmp)
        yield tmps
        _publish_all(paths, tmps, force)
    except OSError as err:
        _remove(tmps)
        raise ToolchainError(
            "cannot write the outputs",
            seen=f"{paths[0].parent}: {err.strerror or err}",
            remedy="check free space and permissions",
        ) from None
    except BaseException:
        _remove(tmps)
        raise


def _publish_all(paths: Sequence[Path], tmps: Sequence[Path], force: bool) -> None:
    """fsync and chmod the staged files, run every BEFORE_PUBLISH guard (a termination the CLI had to
    defer is raised here, before anything appears), then move them all into place with SIGINT and
    SIGTERM held back. ``atomic_path`` and ``atomic_paths`` both publish through here."""
    for tmp in tmps:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # created 0600; give the file the mode open() would
    for guard in BEFORE_PUBLISH:
        guard()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for target, tmp in zip(paths, tmps, strict=True):
            _publish(tmp, target, force)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def write_bytes_atomic(target: PathLike, data: bytes, *, force: bool = True) -> None:
    """Write ``data`` to ``target`` through ``atomic_path``."""
    with atomic_path(target, force=force) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
