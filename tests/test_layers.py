"""The layering contract, read from the source (every import, function-local ones included).

Floors, bottom up: ``toolchain.core`` (errors, file I/O, JSON, patterns, version) depends on nothing of the
project; ``toolchain.kernels`` (tensor math) on core; ``toolchain.adapters`` (method registry, adapter
format) on kernels and core; ``toolchain.graphs`` (ONNX passes) on those three. None of them imports
torch or a runtime: the graph stage runs on a Jetson with numpy, onnx and safetensors only. The TensorRT
package never imports torch. Everything else in ``toolchain`` may use any floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "toolchain"
RUNTIMES = ("torch", "torchvision", "onnxruntime", "polygraphy", "tensorrt", "tensorrt_rtx", "toolchain.peft")
# package: (project packages it may import, third-party roots it must not import)
CONTRACT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "toolchain.core": ((), RUNTIMES),
    "toolchain.kernels": (("toolchain.core",), RUNTIMES),
    "toolchain.adapters": (("toolchain.core", "toolchain.kernels"), RUNTIMES),
    "toolchain.graphs": (("toolchain.core", "toolchain.kernels", "toolchain.adapters"), RUNTIMES),
    "toolchain.trt": (
        (
            "toolchain.core",
            "toolchain.kernels",
            "toolchain.adapters",
            "toolchain.graphs",
            "toolchain.verify",
            "toolchain.feeds",
        ),
        ("torch", "torchvision"),
    ),
}


def imports_of(source: str, module: str) -> list[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved against ``module``)."""
    out: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: -node.level]
                base = ".".join([*parts, base] if base else parts)
            out += [f"toolchain.{a.name}" for a in node.names] if base == "toolchain" else [base]
    return out


def violations(package: str, module: str, source: str) -> list[str]:
    """The imports of ``module`` (in ``package``) that break the contract, as readable lines."""
    allowed, banned = CONTRACT[package]
    bad = []
    for name in imports_of(source, module):
        own = name == package or name.startswith(package + ".")
        if name.startswith("toolchain") and not own and not any(name == a or name.startswith(a + ".") for a in allowed):
            bad.append(f"{module} imports {name} (a higher floor)")
        if any(name == b or name.startswith(b + ".") for b in banned):
            bad.append(f"{module} imports {name} (not allowed in {package})")
    return bad


def modules(package: str) -> list[tuple[str, Path]]:
    folder = PKG / package.removeprefix("toolchain.")
    return [
        (f"{package}.{p.relative_to(folder).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__"), p)
        for p in sorted(folder.rglob("*.py"))
    ]


@pytest.mark.parametrize("package", sorted(CONTRACT))
def test_package_keeps_its_floor(package):
    found = modules(package)
    assert found, f"no modules under {package}"
    bad = [v for module, path in found for v in violations(package, module, path.read_text())]
    assert not bad, "layering contract broken:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("toolchain.core", "from toolchain.kernels import tt\n", "a higher floor"),
        ("toolchain.core", "def f():\n    from toolchain import __version__\n", "a higher floor"),
        ("toolchain.kernels", "from toolchain.adapters.methods import get_method\n", "a higher floor"),
        ("toolchain.adapters", "from toolchain.graphs.fuse import fuse_model\n", "a higher floor"),
        ("toolchain.graphs", "def f():\n    import torch\n", "not allowed"),
        ("toolchain.graphs", "from toolchain.peft.inject import inject\n", "not allowed"),
        ("toolchain.graphs", "from ..workflows import finetune\n", "a higher floor"),
        ("toolchain.trt", "import torch.nn\n", "not allowed"),
    ],
)
def test_a_violation_is_caught(package, source, expected):
    module = f"{package}.probe"
    assert any(expected in v for v in violations(package, module, source))


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("toolchain.graphs", "from toolchain.adapters import methods\nimport numpy\n"),
        ("toolchain.adapters", "from toolchain.kernels.tt import tt_svd\nfrom .methods import KINDS\n"),
        ("toolchain.core", "from toolchain.core.errors import ToolchainError\nimport importlib.metadata\n"),
    ],
)
def test_allowed_imports_pass(package, source):
    assert violations(package, f"{package}.probe", source) == []
