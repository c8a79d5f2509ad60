"""The deployment core imports and fuses with torch (and onnxruntime, polygraphy) blocked, as on a
Jetson with only numpy, onnx and safetensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx

from tests.test_refusals import _good

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "import sys\nfor name in ('torch', 'onnxruntime', 'polygraphy', 'tensorrt'):\n    sys.modules[name] = None\n"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_core_kernels_graphs_import_without_torch():
    code = (
        "import toolchain, toolchain.adapters.methods, toolchain.adapters.adapter_file, toolchain.core.fileio\n"
        "import toolchain.kernels, toolchain.graphs, toolchain.graphs.fuse, toolchain.graphs.diff, "
        "toolchain.graphs.fold, toolchain.cli\n"
        "import toolchain.trt.check, toolchain.trt.record, toolchain.trt.engine, toolchain.inspect_file\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_fuse_diff_and_inspect_run_without_torch(tmp_path):
    base, adapter = _good(tmp_path)
    out = tmp_path / "fused.onnx"
    code = (
        "from toolchain.cli import main\n"
        f"assert main(['fuse', r'{base}', r'{adapter}', '-o', r'{out}']) == 0\n"
        f"assert main(['inspect', r'{adapter}']) == 0\n"
        f"assert main(['diff', r'{base}', r'{out}']) == 0\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert dict((p.key, p.value) for p in onnx.load(out).metadata_props)["toolchain.fused"] == "true"


def test_packages_do_not_install_top_level_kernels_or_graphs():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = __import__("pytest").importorskip("tomli")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert conf["tool"]["setuptools"]["packages"]["find"]["include"] == ["toolchain*"]
    for name in ("core", "kernels", "adapters", "graphs"):
        link = ROOT / "toolchain" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()


def test_an_installed_distribution_named_like_a_root_folder_is_the_one_imported():
    """PyPI's `kernels` (transformers imports it) must not resolve to this repository's kernels/ while
    the suite runs from the root (tests/conftest.py imports it from the installed distribution first)."""
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here")
    import kernels

    assert ROOT not in Path(kernels.__file__).resolve().parents
