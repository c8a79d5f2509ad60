"""Graph-stage benchmarks (docs/BENCHMARKS.md).

1. ONNX Runtime latency of base vs fused vs unfused for the three HAR backbones, side by side.
2. `toolchain fuse` time against onnx.load + onnx.save of the same ResNet-50-sized Conv2d model.

    python scripts/bench_graph.py --out runs/bench_graph.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toolchain.adapters.adapter_file import Adapter, ConvGeometry, LayerRecord, save_adapter
from toolchain.kernels import tt_svd, weight_sha256


def latency(tmp: Path, runs: int) -> list[dict]:
    import torch

    from toolchain.bench import bench
    from toolchain.models.registry import build_model, save_checkpoint
    from toolchain.peft.inject import AdaptConfig, extract_adapter, inject

    rows = []
    for name, targets in (("cnn1d", "all"), ("resnet1d", "all"), ("mobilenet1d", "pointwise")):
        torch.manual_seed(0)
        model = build_model(name, 6, 6).eval()
        ck = tmp / f"{name}.pt"
        save_checkpoint(
            model,
            ck,
            spec=name,
            classes=[str(i) for i in range(6)],
            input_shape=(6, 128),
            extra={"data": "watch", "pretrain": {}},
        )
        state = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = AdaptConfig(rank=8, layers=targets)
        inject(model, cfg)
        for m in model.modules():
            if hasattr(m, "delta_g1"):
                torch.nn.init.normal_(m.delta_g1, std=0.05)
        ad = tmp / f"{name}.safetensors"
        save_adapter(extract_adapter(model, state, cfg, {}), ad)
        from toolchain.export import export

        paths = {k: tmp / f"{name}_{k}.onnx" for k in ("base", "fused", "unfused")}
        export(str(ck), str(paths["base"]), force=True)
        export(str(ck), str(paths["fused"]), adapter=str(ad), fuse=True, force=True)
        export(str(ck), str(paths["unfused"]), adapter=str(ad), force=True)
        res = bench([str(paths[k]) for k in ("base", "fused", "unfused")], warmup=50, runs=runs)
        for k, r in zip(("base", "fused", "unfused"), res["results"], strict=True):
            rows.append(
                {"backbone": name, "model": k, **{x: r[x] for x in ("median_ms", "p90_ms", "p99_ms", "ratio_to_first")}}
            )
            print(rows[-1], flush=True)
    return rows


RESNET50 = [(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)]


def resnet50_like(seed: int = 0) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """A chain of Conv2d layers with ResNet-50's bottleneck shapes plus a 2048x1000 head: ~25M parameters."""
    rng = np.random.default_rng(seed)
    nodes, inits, convs = [], [], []
    cur, cin = "x", 3

    def conv(cout: int, k: int) -> None:
        nonlocal cur, cin
        w = (rng.standard_normal((cout, cin, k, k)) * 0.02).astype(np.float32)
        name = f"conv{len(convs)}.weight"
        inits.append(numpy_helper.from_array(w, name))
        out = f"c{len(convs)}"
        nodes.append(helper.make_node("Conv", [cur, name], [out], pads=[k // 2] * 4, name=f"conv{len(convs)}"))
        nodes.append(helper.make_node("Relu", [out], [out + "r"]))
        convs.append((name, w))
        cur, cin = out + "r", cout

    conv(64, 7)
    for mid, out, blocks in RESNET50:
        for _ in range(blocks):
            conv(mid, 1)
            conv(mid, 3)
            conv(out, 1)
    head = (rng.standard_normal((1000, 2048)) * 0.02).astype(np.float32)
    inits += [numpy_helper.from_array(head, "fc.weight")]
    nodes += [
        helper.make_node("GlobalAveragePool", [cur], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.weight"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet50_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model, convs


def adapter_for(convs: list[tuple[str, np.ndarray]], rank: int) -> Adapter:
    layers, tensors = [], {}
    for name, w in convs:
        cores = tt_svd(w, rank)
        layer = name.removesuffix(".weight")
        geom = ConvGeometry(
            "conv2d",
            w.shape[1],
            w.shape[0],
            tuple(w.shape[2:]),
            (1, 1),
            (w.shape[2] // 2,) * 2,
            (1, 1),
            1,
            "zeros",
            False,
        )
        rec = LayerRecord(layer, name, "lora-edge", geom, (1, *(c.shape[2] for c in cores)), 1.0, weight_sha256(w))
        layers.append(rec)
        vals = [np.full((w.shape[0], cores[0].shape[2]), 0.01, np.float32), *cores[1:]]
        tensors.update(dict(zip(rec.tensor_names(), vals, strict=True)))
    return Adapter("lora-edge", layers, [], tensors, {})


def fuse_time(tmp: Path, reps: int) -> dict:
    from toolchain.graphs.fuse import fuse_files

    model, convs = resnet50_like()
    base, ad = tmp / "r50.onnx", tmp / "r50.safetensors"
    onnx.save(model, base)
    save_adapter(adapter_for(convs, 8), ad)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    fuse_t, io_t = [], []
    for i in range(reps):  # interleaved
        t0 = time.perf_counter()
        onnx.save(onnx.load(base), tmp / f"copy{i}.onnx")
        io_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fuse_files(base, ad, tmp / f"fused{i}.onnx")
        fuse_t.append(time.perf_counter() - t0)
    res = {
        "params": params,
        "conv_layers": len(convs),
        "load_save_s": statistics.median(io_t),
        "fuse_s": statistics.median(fuse_t),
    }
    res["ratio"] = res["fuse_s"] / res["load_save_s"]
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_graph.json")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = {"latency": latency(Path(d), a.runs), "fuse": fuse_time(Path(d), a.reps)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
