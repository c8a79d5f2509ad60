"""Where an INT8 model's activations leave their range, measured on hand-built QDQ models with known
inputs (verify's report of it on real models: tests/graphs/test_int8.py)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.records import Saturation, read_verify_report
from toolchain.saturation import heavy, saturation, summary

SCALE = 0.5  # the range is [-64, 63.5]


def _qdq_model(batch, two_quantizers=False):
    """x -> Identity -> t -> Q -> DQ -> y (and, optionally, t -> a second Q -> DQ -> z)."""
    nodes = [helper.make_node("Identity", ["x"], ["t"])]
    outs = [("q", "y")] + ([("q2", "z")] if two_quantizers else [])
    for q, y in outs:
        nodes += [
            helper.make_node("QuantizeLinear", ["t", "s", "zp"], [q]),
            helper.make_node("DequantizeLinear", [q, "s", "zp"], [y]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [batch, 4]) for _, y in outs],
        [
            numpy_helper.from_array(np.asarray(SCALE, np.float32), "s"),
            numpy_helper.from_array(np.asarray(0, np.int8), "zp"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rows(*peaks):
    """One row per peak: zeros with the peak in column 1."""
    x = np.zeros((len(peaks), 4), np.float32)
    x[:, 1] = peaks
    return x


@pytest.mark.parametrize(
    "batch, x, clipped, worst",
    [
        (4, _rows(1.0, -3.0, 63.5, -64.0), None, None),  # at the bounds exactly: nothing clipped
        # QuantizeLinear rounds first: past the bound by less than half a step is not clipped (a ReLU6's 6
        # at the scale 6/127 lands a float hair above 127 and was reported as clipped on every window)
        (4, _rows(63.7, -64.2, 63.74, 0.0), None, None),
        (2, _rows(63.76, 0.0), 0.5, 127.52 / 127),  # 127.52 rounds to 128: clipped
        (2, _rows(0.0, -64.26), 0.5, 128.52 / 128),  # -128.52 rounds to -129: clipped
        (4, _rows(1.0, 127.0, 2.0, 3.0), 0.25, 2.0),  # one window of four past the high bound, twice over
        (4, _rows(1.0, -96.0, 2.0, 3.0), 0.25, 1.5),  # past the low bound: -128 * scale = -64
        (4, _rows(127.0, -128.0, 0.0, 0.0), 0.5, 2.0),  # both sides
        (3, _rows(0.0, 0.0, 0.0, 0.0, 254.0), 0.2, 4.0),  # a fixed batch's padding rows (copies) not counted
        ("N", _rows(*([0.0] * 69), 127.0), 1 / 70, 2.0),  # dynamic batch, run 64 rows at a time
    ],
)
def test_saturation_counts_clipped_windows_and_how_far(tmp_path, batch, x, clipped, worst):
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_model(batch), str(path))
    got = saturation(path, x)
    if clipped is None:
        assert got == ()
        assert summary(got).startswith("no activation")
        return
    (entry,) = got
    assert entry.tensor == "t" and entry.scale == SCALE
    assert entry.windows_clipped == pytest.approx(clipped) and entry.max_over_range == pytest.approx(worst)


def test_a_tensor_feeding_two_quantizers_is_reported_once(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_model(2, two_quantizers=True), str(path))
    assert [s.tensor for s in saturation(path, _rows(200.0, 1.0))] == ["t"]


@pytest.mark.parametrize(
    "shares, is_heavy", [((), False), ((0.01, 0.049), False), ((0.01, 0.05), True), ((1.0,), True)]
)
def test_heavy_is_a_share_of_windows(shares, is_heavy):
    assert heavy(tuple(Saturation(f"t{i}", 1.0, s, 2.0) for i, s in enumerate(shares))) is is_heavy


def test_summary_names_the_worst_first_and_counts_the_rest():
    entries = tuple(Saturation(f"t{i}", 1.0, 1.0 - i / 10, 3.0) for i in range(5))
    text = summary(entries)
    assert text.startswith("5 activations") and "t0 on 100.0% (up to 3.00x)" in text and text.endswith("2 more")
    assert "t3" not in text


def _old_report_text():
    """A verify.json of an INT8 model as written before saturation was measured."""
    report = {
        "reference": "r.onnx", "model": "m.onnx", "engine": None, "iterations": 1, "real_batches": 1,
        "random_inputs": 0, "comparisons": {}, "passed": True, "inputs": "i.json", "outputs": "o.json",
        "agreement": {"data": "watch", "split": "all", "windows": 3, "top1_agreement": 1.0, "min_agreement": 0.99,
                      "f1_model": 1.0, "f1_reference": 1.0, "accuracy_model": 1.0, "accuracy_reference": 1.0,
                      "passed": True},
    }  # fmt: skip
    return json.dumps(report)


def test_old_verify_reports_without_saturation_still_read(tmp_path):
    path = tmp_path / "verify.json"
    path.write_text(_old_report_text())
    assert read_verify_report(path).agreement.saturation == ()


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"tensor": "t", "scale": 1.0, "windows_clipped": 0.5}], "does not have the record's fields"),
        ([{"tensor": "t", "scale": "big", "windows_clipped": 0.5, "max_over_range": 2.0}], "scale"),
        ({"tensor": "t"}, "does not have the record's fields"),
    ],
)
def test_an_edited_saturation_entry_is_refused(tmp_path, entries, message):
    from toolchain.core.errors import ToolchainError

    path = tmp_path / "verify.json"
    report = json.loads(_old_report_text())
    report["agreement"]["saturation"] = entries
    path.write_text(json.dumps(report))
    with pytest.raises(ToolchainError, match=message):
        read_verify_report(path)


@pytest.mark.parametrize(
    "x, used",
    [
        (_rows(1.0, -3.0), 6.0 / 128),  # the larger side decides: -3 / 0.5 = -6 codes of -128
        (_rows(31.75, 0.0), 0.5),  # 63.5 codes of 127: exactly half, coarse
        (_rows(-32.0, 1.0), 0.5),  # -64 of -128
        (_rows(0.0, 0.0), 0.0),  # never non-zero on these windows
        (_rows(32.0, 1.0), None),  # 64 of 127: more than half
        (_rows(200.0, 1.0), None),  # clipped, so not coarse
    ],
)
def test_coarse_names_activations_that_use_at_most_half_their_range(tmp_path, x, used):
    from toolchain.saturation import coarse, coarse_summary, ranges

    path = tmp_path / "m.onnx"
    onnx.save(_qdq_model(2), str(path))
    got = coarse(path, x)
    assert ranges(path, x) == (saturation(path, x), got)
    if used is None:
        assert got == () and coarse_summary(got).startswith("every activation reaches more than 50%")
        return
    (entry,) = got
    assert entry.tensor == "t" and entry.windows_clipped == 0 and entry.max_over_range == pytest.approx(used)
    assert "t (" in coarse_summary(got) and "at most 50%" in coarse_summary(got)


def test_old_verify_reports_without_coarse_ranges_read_and_edited_ones_are_refused(tmp_path):
    from toolchain.core.errors import ToolchainError

    path = tmp_path / "verify.json"
    path.write_text(_old_report_text())
    assert read_verify_report(path).agreement.coarse == ()
    report = json.loads(_old_report_text())
    entry = {"tensor": "x", "scale": 0.1, "windows_clipped": 0.0, "max_over_range": 0.33}
    report["agreement"]["coarse"] = [entry]
    path.write_text(json.dumps(report))
    assert read_verify_report(path).agreement.coarse == (Saturation(**entry),)
    report["agreement"]["coarse"] = [{"tensor": "x"}]
    path.write_text(json.dumps(report))
    with pytest.raises(ToolchainError, match="a verify coarse entry"):
        read_verify_report(path)
