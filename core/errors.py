"""The one error type users see: a rule, the value seen, and the remedy."""

from __future__ import annotations


class ToolchainError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits non-zero.

    Build it with the rule that was broken, the value that broke it and what to do::

        raise ToolchainError("rank must be >= 1", seen=rank, remedy="pass --rank 1 or more")
    """

    def __init__(self, rule: str, *, seen: object = None, remedy: str | None = None) -> None:
        self.rule = rule
        self.seen = seen
        self.remedy = remedy
        parts = [rule]
        if seen is not None:
            parts.append(f"got {_short(seen)}")
        if remedy:
            parts.append(remedy)
        super().__init__("; ".join(parts))


def _short(value: object, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, str) else value
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
