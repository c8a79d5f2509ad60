"""The ``toolchain`` command line. Heavy packages (torch, onnxruntime, tensorrt) load per command."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolchain.cli_parser import build_parser
from toolchain.commands import print_json  # noqa: F401  (toolchain.cli.print_json, as before)
from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import BEFORE_PUBLISH

Handler = Callable[[argparse.Namespace], int]

EXTRAS = {
    "torch": "train",
    "onnxscript": "train",
    "tqdm": "train",
    "seglearn": "train",
    "onnxruntime": "verify",
    "polygraphy": "verify",
    "matplotlib": "plots",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial outputs are cleaned up as on Ctrl-C."""


_OURS = tuple(
    str(Path(p).resolve())
    for p in (
        Path(__file__).parent,
        Path(__file__).parent / "core",
        Path(__file__).parent / "kernels",
        Path(__file__).parent / "adapters",
        Path(__file__).parent / "graphs",
    )
)
_STDLIB = str(Path(contextlib.__file__).resolve().parent)
RETRY_S = 0.05


def _safe_to_raise(frame: Any) -> bool:
    """True when every frame on the stack is this package's or the standard library's: an exception
    raised now cannot be swallowed by a bare ``except:`` in third-party code (Polygraphy's lazy
    importer did that, and verify went on to print PASSED, then crashed)."""
    while frame is not None and frame.f_code is not main.__code__:  # the frames main() called
        name = (
            str(Path(frame.f_code.co_filename).resolve()) if not frame.f_code.co_filename.startswith("<") else _STDLIB
        )
        if not (name.startswith(_OURS) or (name.startswith(_STDLIB) and "site-packages" not in name)):
            return False
        frame = frame.f_back
    return True


_DEFERRED: list[bool] = []  # a SIGTERM arrived inside third-party code and is not raised yet


def _on_sigterm(signum: int, frame: Any) -> None:
    """Raise Terminated where that is safe; inside third-party code, look again every 50 ms (SIGALRM)."""
    if _safe_to_raise(frame):
        _raise_terminated()
    _DEFERRED[:] = [True]
    signal.signal(signal.SIGALRM, _on_sigterm)
    signal.setitimer(signal.ITIMER_REAL, RETRY_S)


def _raise_terminated() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    _DEFERRED.clear()
    raise Terminated()


def _before_publish() -> None:
    """A SIGTERM deferred while third-party code wrote the staged files is raised before they are
    published, so an interrupted run leaves none of them (not all of them and exit 143)."""
    if _DEFERRED:
        _raise_terminated()


# Every count and size an option can set, bounded before anything is allocated: (low, high).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "seed": (0, 2**32 - 1),
    "seeds": (1, 1000),
    "epochs": (1, 100_000),
    "pretrain_epochs": (1, 100_000),
    "steps": (0, 10_000_000),
    "batch_size": (1, 65_536),
    "reduction": (1, 4096),
    "real": (0, 10_000),
    "random": (1, 10_000),
    "eval_every": (1, 1_000_000),
    "workers": (1, 4096),
}
COMMAND_BOUNDS: dict[str, dict[str, tuple[int, int]]] = {
    "compare": {"steps": (1, 10_000_000)}
}  # compare trains a fixed number of steps
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {"lr": (1e-12, 10.0), "scaling": (-1e4, 1e4)}


def check_bounds(a: argparse.Namespace) -> None:
    """One place that bounds every numeric option (a huge --random, a seed past 2**32, --scaling inf)."""
    for name, (low, high) in {**INT_BOUNDS, **COMMAND_BOUNDS.get(a.command, {})}.items():
        value = getattr(a, name, None)
        if value is not None and not (type(value) is int and low <= value <= high):
            raise ToolchainError(
                f"--{name.replace('_', '-')} must be an integer from {low} to {high}",
                seen=value,
                remedy=f"pass --{name.replace('_', '-')} within that range",
            )
    for name, (f_low, f_high) in FLOAT_BOUNDS.items():
        number = getattr(a, name, None)
        if number is not None and not (math.isfinite(number) and f_low <= number <= f_high):
            raise ToolchainError(
                f"--{name} must be a finite number from {f_low:g} to {f_high:g}",
                seen=number,
                remedy="pass e.g. --scaling 1.0" if name == "scaling" else "pass e.g. --lr 5e-3",
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; no tracebacks for them."""
    args = build_parser().parse_args(argv)
    name = f"toolchain {args.command}"
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_alarm = signal.getsignal(signal.SIGALRM)
    _DEFERRED.clear()
    BEFORE_PUBLISH.append(_before_publish)
    try:
        check_bounds(args)
        handler: Handler = args.func
        code = handler(args)
        _before_publish()  # a SIGTERM still deferred when the command ends: never exit 0 past it
        return code
    except ToolchainError as err:
        return _fail(name, str(err), 2)
    except ModuleNotFoundError as err:
        root = (err.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        return _fail(
            name,
            f"needs the optional package {root}, which is not installed; install it with: pip install "
            f"'toolchain[{EXTRAS[root]}]'",
            2,
        )
    except BrokenPipeError:  # e.g. `toolchain inspect x | head -1`: the reader left
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # the environment, not the input: a full disk, a vanished folder
        return _fail(
            name, f"{err.strerror or err}: {err.filename or ''}; check the path, its permissions and free space", 2
        )
    except KeyboardInterrupt:
        return _fail(name, "interrupted; no partial output was left", 130)
    except Exception as err:
        if type(err).__name__ != "PolygraphyException":
            raise
        return _fail(name, f"Polygraphy failed: {' '.join(str(err).split())[:300]}", 2)
    except Terminated:
        return _fail(name, "terminated; no partial output was left", 143)
    finally:
        BEFORE_PUBLISH.remove(_before_publish)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        signal.signal(signal.SIGTERM, previous)


def _fail(name: str, message: str, code: int) -> int:
    with contextlib.suppress(OSError):
        print(f"{name}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
