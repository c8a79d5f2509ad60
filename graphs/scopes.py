"""Which PyTorch module a node of an exported graph came from, where the exporter recorded it.

torch's dynamo exporter writes ``pkg.torch.onnx.name_scopes`` on every node: ``['', 'blocks',
'blocks.0', 'blocks.0.conv', 'conv2d_1']``, the module path being the entry before the op's own name
(``''`` for a call in the root module's forward). The TorchScript-based exporter names nodes by scope:
``/blocks/blocks.0/conv/Conv``, whose last folder ends the module's path (``conv_1`` for its second
call; torch 2.5 writes ``features.0.0`` for ``net.features.0.0``), ``/blocks/blocks.0/Conv`` being a
functional call in ``blocks.0``'s forward and ``/Conv`` one in the root's. A hand-made graph carries
neither; then nothing is known (None).
"""

from __future__ import annotations

import ast
import re

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"  # its last entry: the aten op, e.g. 'aten.conv2d.default'
REWRITTEN_KEY = "pkg.onnxscript.rewriter.rule_name"
_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # a dotted module path: blocks.0.conv
_REPEAT = re.compile(r"_\d+$")  # the TorchScript exporter's suffix for a module's second, third... call


def module_of(node: onnx.NodeProto) -> str | None:
    """The dynamo exporter's module path of a Conv ``node`` ("" for the root), or None where it did not
    record one: also for a Conv an optimizer rule wrote (BatchNorm folded into a Conv carries the
    BatchNorm's scopes) and for one that was not an aten convolution."""
    meta = {p.key: p.value for p in node.metadata_props}
    raw = meta.get(SCOPES_KEY)
    if raw is None or REWRITTEN_KEY in meta or "aten.conv" not in meta.get(CLASSES_KEY, "aten.conv").rsplit(",", 1)[-1]:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2 or not all(isinstance(s, str) for s in scopes):
        return None
    modules = scopes[1:-1]  # '' (the root), then each module's path, then the op's own name
    if scopes[0] != "" or not all(_PATH.fullmatch(m) for m in modules):
        return None  # torch 2.5 writes tracing expressions here for some models ("getattr(L['fn'], '0')")
    return modules[-1] if modules else ""


def belongs_to(node: onnx.NodeProto, module: str) -> bool | None:
    """Whether ``node`` is a call of ``module`` (a dotted module path); None when the graph does not say."""
    recorded = module_of(node)
    if recorded is not None:
        return recorded == module
    name = node.name
    if not name.startswith("/"):
        return None
    folders = name.split("/")[1:-1]
    if not folders:
        return module == ""
    # the last folder names the module: its attribute ("conv", "conv_1" for a second call) on torch 2.13,
    # its path below the root's first child ("features.0.0" for net.features.0.0) on torch 2.5
    return any(module == name or module.endswith("." + name) for name in {folders[-1], _REPEAT.sub("", folders[-1])})
