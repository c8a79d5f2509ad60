"""User regular expressions (``--layers``, PEFT's rank_pattern and alpha_pattern) with a bound.

Python's ``re`` backtracks, and a pattern with a repeat inside a repeat, or an alternation inside a
repeat, such as ``(a+)+$`` or ``(a|aa)*$``, can take exponential time on a name that almost matches.
``compile_user_pattern`` refuses those shapes (star height above one), more than ``MAX_REPEATS``
repeats, and patterns or names longer than the limits below, so every match it allows takes at most
about len(name) ** 3 steps.
"""

from __future__ import annotations

import re
from typing import Any

from toolchain.core.errors import ToolchainError

try:  # Python 3.11+
    import re._parser as _sre_parse  # type: ignore[import-not-found]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN = 256
MAX_SUBJECT = 256  # module names; a longer name is not matched
MAX_REPEATS = 3  # unbounded repeats in one pattern: matching is O(len(name) ** MAX_REPEATS) at worst
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


def compile_user_pattern(pattern: str, what: str, remedy: str) -> re.Pattern[str]:
    """Compile ``pattern`` or refuse it in one line (invalid, too long, or a nested repeat)."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise ToolchainError(
            f"{what} must be a regular expression of at most {MAX_PATTERN} characters",
            seen=pattern if isinstance(pattern, str) else type(pattern).__name__,
            remedy=remedy,
        )
    try:
        compiled = re.compile(pattern)
        tree = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ToolchainError(
            f"{what} is not a valid regular expression", seen=f"{pattern!r}: {err}", remedy=remedy
        ) from None
    if _count_repeats(tree) > MAX_REPEATS:
        raise ToolchainError(
            f"{what} has more than {MAX_REPEATS} repeats (*, +, {{m,n}})",
            seen=pattern,
            remedy="use fewer wildcards, e.g. 'conv' matches anywhere in a name",
        )
    if _nested(tree, inside=False):
        raise ToolchainError(
            f"{what} repeats a group that itself repeats or alternates; matching it can take exponential time",
            seen=pattern,
            remedy="write it without a quantifier on such a group, e.g. 'features\\.(0|2)\\.0' or 'conv.*'",
        )
    return compiled


def _nested(items: Any, inside: bool) -> bool:
    """True when a repeat (of more than one) holds another repeat or a branch."""
    for op, arg in items:
        name = str(op)
        if name in _REPEATS:
            _, high, body = arg
            many = high is _sre_parse.MAXREPEAT or high > 1
            if many and inside:
                return True
            if _nested(body, inside or many):
                return True
        elif name == "BRANCH":
            if inside:
                return True
            if any(_nested(b, inside) for b in arg[1]):
                return True
        elif name == "SUBPATTERN":
            if _nested(arg[-1], inside):
                return True
        elif name in ("ASSERT", "ASSERT_NOT"):
            if _nested(arg[1], inside):
                return True
    return False


def _count_repeats(items: Any) -> int:
    count = 0
    for op, arg in items:
        name = str(op)
        if name in _REPEATS:
            count += int(arg[1] is _sre_parse.MAXREPEAT or arg[1] > 1) + _count_repeats(arg[2])
        elif name == "BRANCH":
            count += sum(_count_repeats(b) for b in arg[1])
        elif name == "SUBPATTERN":
            count += _count_repeats(arg[-1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            count += _count_repeats(arg[1])
    return count


def search(pattern: re.Pattern[str], subject: str) -> bool:
    return len(subject) <= MAX_SUBJECT and pattern.search(subject) is not None


def fullmatch(pattern: re.Pattern[str], subject: str) -> bool:
    return len(subject) <= MAX_SUBJECT and pattern.fullmatch(subject) is not None
