"""Kill a writing process at random moments: the target is the previous file, the new one, or absent."""

import random
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels import tt_svd, weight_sha256
from toolchain.adapter_file import Adapter, ConvGeometry, LayerRecord, save_adapter
from toolchain.cli import main


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
        rec = LayerRecord(f"c{i}", f"c{i}.weight", "lora-edge", g, (1, *(c.shape[2] for c in cores)), 1.0, weight_sha256(w))
        recs.append(rec)
        tensors.update(dict(zip(rec.tensor_names(), [np.full((ch, cores[0].shape[2]), 0.01, np.float32), *cores[1:]], strict=True)))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, ch, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "base.onnx")
    save_adapter(Adapter("lora-edge", recs, [], tensors, {}), tmp_path / "adapter.safetensors")


def test_killed_fuse_never_leaves_a_partial_target(tmp_path):
    _chain(tmp_path)
    base, adapter = tmp_path / "base.onnx", tmp_path / "adapter.safetensors"
    assert main(["fuse", str(base), str(adapter), "-o", str(tmp_path / "ref.onnx")]) == 0
    new = (tmp_path / "ref.onnx").read_bytes()
    old = b"previous model that must survive"
    rng = random.Random(7)
    outcomes: Counter[str] = Counter()
    for i in range(10):
        target = tmp_path / f"t{i}.onnx"
        had_old = i % 2 == 0
        if had_old:
            target.write_bytes(old)
        proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "fuse", str(base), str(adapter), "-o", str(target), "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not target.exists():
            assert not had_old, "the previous file was lost"
            outcomes["absent"] += 1
        else:
            data = target.read_bytes()
            assert data in (old, new), f"partial target after kill {i}: {len(data)} bytes"
            outcomes["new" if data == new else "old"] += 1
    assert sum(outcomes.values()) == 10
    print(dict(outcomes))
