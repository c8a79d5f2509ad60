"""One strict JSON reader for every JSON file and metadata entry the project reads.

Strict means: duplicate keys, NaN/Infinity and nesting deeper than ``MAX_DEPTH`` are refused, a file
must be a regular file under a size limit, and every failure is one ToolchainError that names the
rule, the value seen and the remedy (never a RecursionError or a JSONDecodeError traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from toolchain.core.errors import ToolchainError
from toolchain.core.fileio import read_regular_file, write_bytes_atomic

T = TypeVar("T")
MAX_DEPTH = 64
MAX_JSON_BYTES = 1 << 20


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {sorted({k for k in keys if keys.count(k) > 1})[0]!r}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def loads_strict(text: str | bytes, what: str, remedy: str) -> Any:
    """Parse ``text`` strictly; ``what`` names it in errors ("the fleet manifest")."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ToolchainError(
            f"{what} is nested deeper than {MAX_DEPTH} levels", seen="too deep to parse", remedy=remedy
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ToolchainError(
            f"{what} is not valid JSON", seen=f"{type(err).__name__}: {str(err)[:80]}", remedy=remedy
        ) from None
    if depth(value) > MAX_DEPTH:
        raise ToolchainError(f"{what} is nested deeper than {MAX_DEPTH} levels", seen=depth(value), remedy=remedy)
    return value


def read_json(path: str | os.PathLike[str], what: str, remedy: str, *, limit: int = MAX_JSON_BYTES) -> Any:
    """A regular file of at most ``limit`` bytes, parsed strictly."""
    return loads_strict(read_regular_file(Path(path), limit, what=what, remedy=remedy), what, remedy)


def require(value: Any, kind: type | tuple[type, ...], what: str, remedy: str) -> Any:
    """``value`` if it is of ``kind`` (bool is not an int here), else a one-line error naming the field."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ToolchainError(f"{what} must be {names}", seen=type(value).__name__, remedy=remedy)
    return value


def dumps_json(value: Any) -> bytes:
    """The project's JSON file layout: 2-space indent, sorted keys, a final newline."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: str | os.PathLike[str], value: Any, *, force: bool = True) -> None:
    """Write ``value`` as a JSON file, atomically (``dumps_json``'s layout)."""
    write_bytes_atomic(path, dumps_json(value), force=force)


_SIMPLE: dict[Any, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "None": (type(None),),
}


def _kinds(annotation: str) -> tuple[type, ...] | None:
    """The runtime types a field's annotation string allows ("float | None" -> (float, int, NoneType));
    None when the annotation is not one this reader checks."""
    kinds: tuple[type, ...] = ()
    for part in annotation.split("|"):
        base = part.strip().split("[", 1)[0]
        if base not in _SIMPLE:
            return None
        kinds += _SIMPLE[base]
    return kinds


def record_from_dict(cls: type[T], value: Any, what: str, remedy: str) -> T:
    """A dataclass record from parsed JSON: an object with exactly the record's fields, each of its type."""
    require(value, dict, what, remedy)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if set(value) != set(names):
        missing, extra = sorted(set(names) - set(value)), sorted(set(value) - set(names))
        raise ToolchainError(
            f"{what} does not have the record's fields",
            seen=f"missing {missing[:3]}, unknown {extra[:3]}",
            remedy=remedy,
        )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kinds = _kinds(str(f.type))
        if kinds is not None:
            require(value[f.name], kinds, f"{what}: {f.name}", remedy)
    return cls(**value)


def read_record(cls: type[T], path: str | os.PathLike[str], what: str, remedy: str) -> T:
    """Read one typed JSON record written by ``write_json(path, dataclasses.asdict(record))``."""
    return record_from_dict(cls, read_json(path, what, remedy), what, remedy)
