"""Which TensorRT is importable, whether it can build here, its logger, and its errors as one line.

``build`` and ``refit`` need TensorRT 10.x (the Orin Nano's JetPack 6.x ships 10.3) and a GPU.
``build --check`` parses with whichever TensorRT imports: 10.x where present, else TensorRT-RTX
(PyPI's ``tensorrt-rtx-cu12``, which imports and parses without a GPU but builds no Jetson engines).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from toolchain.core.errors import ToolchainError

HOWTO = (
    "on a Jetson Orin Nano flash JetPack 6.x (TensorRT 10.3, python3-libnvinfer) and create the venv with "
    "--system-site-packages; "
    "on an x86 host with an NVIDIA GPU `pip install tensorrt-cu12==10.3.*` (the same TensorRT as JetPack 6)"
)
CHECK_HOWTO = "pip install 'toolchain[trt-check]' (TensorRT-RTX's parser, no GPU needed), or install TensorRT 10.x"
SUPPORTED_MAJOR = 10


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT module and what it is."""

    module: Any
    name: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.name == 'tensorrt_rtx' else 'TensorRT'} {self.version}"


def _import(name: str) -> ModuleType | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except Exception:  # PyPI's placeholder wheels raise at import
        return None


def version_problem(version: str) -> str | None:
    """Why this TensorRT version cannot build engines for the Orin Nano, or None."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"TensorRT reports an unreadable version {version!r}"
    if major < SUPPORTED_MAJOR:
        return f"TensorRT {version} is older than 10.x (no REFIT_INDIVIDUAL, no OnnxParserRefitter)"
    if major > SUPPORTED_MAJOR:
        return (
            f"TensorRT {version} is not supported: 11.x removed weakly typed networks (BuilderFlag.FP16) and "
            "no JetPack ships it"
        )
    return None


@functools.lru_cache(maxsize=1)
def tensorrt_status() -> str | None:
    """None when TensorRT 10.x and a GPU can build engines here, else a sentence saying what is missing
    (computed once)."""
    trt = _import("tensorrt")
    if trt is None:
        if _import("tensorrt_rtx") is not None:
            return (
                "only TensorRT-RTX is installed (it checks models with `toolchain build --check` but builds "
                "no Jetson engines)"
            )
        return "TensorRT is not installed"
    problem = version_problem(str(getattr(trt, "__version__", "?")))
    if problem:
        return problem
    try:
        if trt.Builder(logger(trt)) is None:
            return "TensorRT could not create a builder (no NVIDIA GPU or driver)"
    except Exception as err:  # a missing driver raises at Builder()
        return f"TensorRT is present but unusable ({type(err).__name__}: {str(err)[:120]})"
    return None


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, 10.x and able to build, or a one-line ToolchainError saying how to get it."""
    missing = tensorrt_status()
    if missing:
        raise ToolchainError(
            f"{missing}; build and refit need TensorRT 10.x and an NVIDIA GPU", seen="this machine", remedy=HOWTO
        )
    import tensorrt as trt

    return trt


def parser_tensorrt() -> TensorRT:
    """The TensorRT used for `build --check`: 10.x where importable, else TensorRT-RTX."""
    for name in ("tensorrt", "tensorrt_rtx"):
        module = _import(name)
        if module is None:
            continue
        version = str(getattr(module, "__version__", "?"))
        if name == "tensorrt" and version_problem(version):
            continue
        return TensorRT(module, name, version)
    raise ToolchainError(
        "no TensorRT parser is importable", seen="neither tensorrt 10.x nor tensorrt_rtx", remedy=CHECK_HOWTO
    )


_LOGGERS: dict[int, Any] = {}


def logger(trt: Any) -> Any:
    """One TensorRT logger per process and module: Polygraphy's own for ``tensorrt`` (TensorRT warns
    when builders get different loggers), a plain ERROR-level one for TensorRT-RTX."""
    key = id(trt)
    if key not in _LOGGERS:
        made = None
        if getattr(trt, "__name__", "") == "tensorrt":
            with contextlib.suppress(Exception):
                from polygraphy.backend.trt.util import get_trt_logger

                made = get_trt_logger()
        _LOGGERS[key] = made if made is not None else _quiet_logger(trt)
    return _LOGGERS[key]


def _quiet_logger(trt: Any) -> Any:
    """A logger that keeps TensorRT's errors (for the one-line message) instead of printing them."""

    class Quiet(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                _record(msg)

    return Quiet()


_SINKS: list[list[str]] = []  # the error lists of the trt_errors blocks now running


def _record(message: Any) -> None:
    with contextlib.suppress(Exception):
        text = str(message() if callable(message) else message)
        for sink in _SINKS:
            sink.append(text)


@contextlib.contextmanager
def trt_errors() -> Iterator[list[str]]:
    """Collect the error messages TensorRT logs while the block runs: through Polygraphy's logger
    (``tensorrt``) or this module's quiet logger (TensorRT-RTX)."""
    errors: list[str] = []
    _SINKS.append(errors)
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        G_LOGGER = None
    original = G_LOGGER.error if G_LOGGER is not None and len(_SINKS) == 1 else None

    def hook(message: Any, *args: Any, **kwargs: Any) -> Any:
        _record(message)
        return original(message, *args, **kwargs)  # type: ignore[misc]

    if original is not None:
        G_LOGGER.error = hook
    try:
        yield errors
    finally:
        _SINKS.remove(errors)
        if original is not None:
            del G_LOGGER.error  # the instance attribute shadowed the method; removing it restores the method


def last_error(errors: list[str], fallback: str) -> str:
    """The last logged TensorRT error on one line (or ``fallback``)."""
    text = errors[-1] if errors else fallback
    return " ".join(text.split())[:300]
