"""Names-only API surfaces of TensorRT 10.3's Python bindings and of Polygraphy at its floor version.

TensorRT cannot be installed on the development machines, so the device code is checked against
the names its bindings define. This script reads the pybind11 sources of a TensorRT release
(``python/src/**/*.cpp`` and ``python/packaging/bindings_wheel/tensorrt/__init__.py`` at the tag)
from a git checkout of NVIDIA/TensorRT, and the modules of a Polygraphy wheel, and writes
``tests/data/api_surface.json``: module-level names and, per class, its members (methods,
properties, enum values, inherited ones included). Nothing of either project is copied but names.

    python3 scripts/api_surface.py --trt-repo /path/to/NVIDIA/TensorRT.git --trt-tag v10.3.0 \\
        --polygraphy-wheel polygraphy-0.53.4-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import zipfile
from pathlib import Path

DECL = re.compile(r'py::(class_|enum_)<([^;{(]*?)>\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*"(\w+)"')
MEMBER = re.compile(
    r'\.(def|def_property|def_property_readonly|def_readwrite|def_readonly|def_static|value)\(\s*"(\w+)"'
)
MODULE_DEF = re.compile(r'\bm\.(?:def|attr)\(\s*"(\w+)"')


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True, capture_output=True, text=True).stdout


def trt_surface(repo: str, tag: str) -> dict[str, object]:
    """Module names and class members from the pybind11 sources at ``tag``."""
    files = [f for f in _git(repo, "ls-tree", "-r", "--name-only", tag, "python/src").split() if f.endswith(".cpp")]
    classes: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    cpp_to_py: dict[str, str] = {}
    exported: dict[str, str] = {}  # enum -> the scope its values are exported into
    module: set[str] = set()
    for f in files:
        text = _git(repo, "show", f"{tag}:{f}")
        decls = [(m.start(), m) for m in DECL.finditer(text)]
        for _, m in decls:
            targs = [a.strip() for a in re.split(r",(?![^<]*>)", m.group(2))]
            py_name, scope = m.group(5), m.group(4)
            cpp_to_py[targs[0].split("::")[-1]] = py_name
            classes.setdefault(py_name, set())
            bases[py_name] = [a.split("::")[-1] for a in targs[1:] if not a.startswith(("std::", "py::"))]
            if scope == "m":
                module.add(py_name)
            else:
                exported[py_name] = scope
        for member in MEMBER.finditer(text):
            owner = next((m.group(5) for pos, m in reversed(decls) if pos < member.start()), None)
            if owner is not None:
                classes[owner].add(member.group(2))
        module.update(MODULE_DEF.findall(text))
        for enum, scope_var in list(exported.items()):  # values exported into the enclosing class
            holder = next((m.group(5) for _, m in decls if m.group(3) == scope_var), None)
            if holder and "export_values" in text:
                classes[holder].update(classes[enum] | {enum})
    init = _git(repo, "show", f"{tag}:python/packaging/bindings_wheel/tensorrt/__init__.py")
    tree = ast.parse(re.sub(r"##(\w+)##", r"\1", init))  # the packaging template has ##PLACEHOLDER## names
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            module.add(node.name)
        elif isinstance(node, ast.Assign):
            module.update(t.id for t in node.targets if isinstance(t, ast.Name))
    module.add("__version__")
    resolved = {name: sorted(_members(name, classes, bases, cpp_to_py)) for name in classes}
    return {
        "source": f"NVIDIA/TensorRT {tag}: python/src/**/*.cpp, python/packaging/bindings_wheel/tensorrt/__init__.py",
        "module": sorted(module),
        "classes": resolved,
    }


def _members(
    name: str, classes: dict[str, set[str]], bases: dict[str, list[str]], cpp_to_py: dict[str, str]
) -> set[str]:
    out = set(classes.get(name, set()))
    for base in bases.get(name, []):
        py = cpp_to_py.get(base)
        if py and py != name:
            out |= _members(py, classes, bases, cpp_to_py)
    return out


def polygraphy_surface(wheel: str) -> dict[str, object]:
    """Top-level names (defined, imported, or brought in by ``from X import *``) of every module in the wheel."""
    names: dict[str, set[str]] = {}
    stars: dict[str, list[str]] = {}
    exported: dict[str, list[str] | None] = {}
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith("polygraphy/") or not info.filename.endswith(".py"):
                continue
            dotted = info.filename[:-3].replace("/", ".").removesuffix(".__init__")
            tree = ast.parse(z.read(info).decode())
            names[dotted], stars[dotted], exported[dotted] = _top_level(
                tree, dotted, info.filename.endswith("__init__.py")
            )
    for _ in range(10):  # star imports, to a fixed point
        for module, sources in stars.items():
            for src in sources:
                public = exported.get(src) or [n for n in names.get(src, ()) if not n.startswith("_")]
                names[module] |= set(public)
    version = re.search(r"polygraphy-([\d.]+)-", Path(wheel).name)
    return {
        "source": Path(wheel).name,
        "version": version.group(1) if version else None,
        "modules": {k: sorted(v) for k, v in sorted(names.items())},
    }


def _top_level(tree: ast.Module, dotted: str, package: bool) -> tuple[set[str], list[str], list[str] | None]:
    names: set[str] = set()
    stars: list[str] = []
    exported: list[str] | None = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets) and isinstance(
                node.value, ast.List | ast.Tuple
            ):
                exported = [
                    e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, dotted, package)
            for a in node.names:
                if a.name == "*":
                    stars.append(source)
                else:
                    names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names, stars, exported


def _absolute(node: ast.ImportFrom, dotted: str, package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = dotted.split(".") if package else dotted.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trt-repo", required=True, help="git directory of NVIDIA/TensorRT")
    ap.add_argument("--trt-tag", default="v10.3.0")
    ap.add_argument("--polygraphy-wheel", required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "api_surface.json"))
    a = ap.parse_args()
    surface = {"tensorrt": trt_surface(a.trt_repo, a.trt_tag), "polygraphy": polygraphy_surface(a.polygraphy_wheel)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
    trt = surface["tensorrt"]
    print(
        f"{a.out}: tensorrt {len(trt['module'])} module names, {len(trt['classes'])} classes; polygraphy "
        f"{len(surface['polygraphy']['modules'])} modules"
    )


if __name__ == "__main__":
    main()
