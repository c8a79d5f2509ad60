"""The installed distribution's version, read from its metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """``toolchain``'s version as installed; "0+unknown" when run from a tree that was never installed."""
    try:
        return metadata.version("toolchain")
    except metadata.PackageNotFoundError:
        return "0+unknown"
