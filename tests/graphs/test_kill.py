"""Kill a writing process at random moments: the target is the previous file, the new one, or absent."""

import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.adapters.adapter_file import Adapter, ConvGeometry, LayerRecord, save_adapter
from toolchain.cli import main
from toolchain.kernels import tt_svd, weight_sha256


def _chain(tmp_path, layers=12, ch=192):
    rng = np.random.default_rng(0)
    nodes, inits, recs, tensors, cur = [], [], [], {}, "x"
    for i in range(layers):
        w = (rng.standard_normal((ch, ch if i else 3, 3, 3)) * 0.05).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"c{i}.weight"))
        nodes.append(helper.make_node("Conv", [cur, f"c{i}.weight"], [f"y{i}"], pads=[1, 1, 1, 1], name=f"c{i}"))
        cur = f"y{i}"
        cores = tt_svd(w, 4)
        g = ConvGeometry("conv2d", w.shape[1], ch, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros", False)
        rec = LayerRecord(
            f"c{i}", f"c{i}.weight", "lora-edge", g, (1, *(c.shape[2] for c in cores)), 1.0, weight_sha256(w)
        )
        recs.append(rec)
        tensors.update(
            dict(zip(rec.tensor_names(), [np.full((ch, cores[0].shape[2]), 0.01, np.float32), *cores[1:]], strict=True))
        )
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, ch, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "base.onnx")
    save_adapter(Adapter("lora-edge", recs, [], tensors, {}), tmp_path / "adapter.safetensors")


def _start_and_wait_for_partial(
    cmd: list[str], folder, target_name: str, timeout: float = 60.0
) -> tuple[subprocess.Popen, bool]:
    """Start ``cmd``; return once its temporary ``.partial`` output exists (mid-write), or it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(folder.glob(f".{target_name}.*.partial")):
            return proc, True
        time.sleep(0.0005)
    return proc, False


def _fuse_cmd(base, adapter, target) -> list[str]:
    return [sys.executable, "-m", "toolchain.cli", "fuse", str(base), str(adapter), "-o", str(target), "--force"]


@pytest.mark.slow
def test_killed_fuse_never_leaves_a_partial_target(tmp_path):
    _chain(tmp_path)
    base, adapter = tmp_path / "base.onnx", tmp_path / "adapter.safetensors"
    assert main(["fuse", str(base), str(adapter), "-o", str(tmp_path / "ref.onnx")]) == 0
    new = (tmp_path / "ref.onnx").read_bytes()
    old = b"previous model that must survive"
    outcomes: Counter[str] = Counter()
    for i in range(10):
        target = tmp_path / f"t{i}.onnx"
        had_old = i % 2 == 0
        if had_old:
            target.write_bytes(old)
        proc, mid_write = _start_and_wait_for_partial(_fuse_cmd(base, adapter, target), tmp_path, target.name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes["mid-write" if mid_write else "not mid-write"] += 1
        if not target.exists():
            assert not had_old, "the previous file was lost"
        else:
            data = target.read_bytes()
            assert data in (old, new), f"partial target after kill {i}: {len(data)} bytes"
    assert outcomes["mid-write"] >= 8, f"kills must land while the output is being written: {dict(outcomes)}"


def test_sigterm_mid_write_removes_the_partial_file_and_keeps_the_old_target(tmp_path):
    _chain(tmp_path)
    base, adapter = tmp_path / "base.onnx", tmp_path / "adapter.safetensors"
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous model that must survive")
    proc, mid_write = _start_and_wait_for_partial(_fuse_cmd(base, adapter, target), tmp_path, target.name)
    assert mid_write, "the fuse ended before its output was written"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    leftovers = list(tmp_path.glob(".*.partial"))
    assert leftovers == [], leftovers
    if rc == 143:  # terminated mid-write: the old target stays
        assert target.read_bytes() == b"previous model that must survive"
    else:  # the rename won the race: the new model, whole
        assert rc == 0 and onnx.load(target).graph.node
