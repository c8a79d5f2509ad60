"""toolchain.flips: the agreement's interval, and which windows flip with how sure the reference was."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolchain.flips import MAX_LISTED, flip_fields, flipped_rows, summary, top2_margins, wilson_interval
from toolchain.records import FLIP_FIELDS, Agreement, VerifyReport, read_verify_report, write_verify_report

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("agree, n", [(0, 10), (10, 10), (201, 205), (203, 205), (4, 7), (1, 1), (9990, 10000)])
def test_wilson_interval_matches_scipy(agree, n):
    ci = scipy_stats.binomtest(agree, n).proportion_ci(method="wilson")
    assert wilson_interval(agree, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


@pytest.mark.parametrize(
    "outputs, expected",
    [
        ([[0.0, 3.0, 1.0], [5.0, 5.0, -1.0]], [2.0, 0.0]),  # a tie has margin 0
        ([[1.0], [2.0]], [0.0, 0.0]),  # one class: never flips, no margin
        ([[[0.0, 9.0], [4.0, 0.0]], [[1.0, 2.0], [0.0, 0.0]]], [4.0, 1.0]),  # (N, K, T): the least sure position
    ],
)
def test_top2_margins(outputs, expected):
    assert top2_margins(np.asarray(outputs, np.float32)).tolist() == pytest.approx(expected)


def _logits(rng, n, k):
    ref = rng.standard_normal((n, k)) * 3
    model = ref + rng.standard_normal((n, k))  # INT8-like noise: flips the least sure windows most often
    return model, ref


@pytest.mark.parametrize("n, k, seed", [(205, 6, 0), (205, 6, 1), (400, 3, 2), (30, 2, 3)])
def test_flip_fields_agree_with_brute_force(n, k, seed):
    model, ref = _logits(np.random.default_rng(seed), n, k)
    got, want = model.argmax(1), ref.argmax(1)
    fields = flip_fields(model, ref)
    flips = [i for i in range(n) if got[i] != want[i]]
    margins = [sorted(r)[-1] - sorted(r)[-2] for r in ref]
    assert fields["flipped"] == len(flips) > 0
    assert sorted(fields["flipped_windows"]) == flips[:MAX_LISTED] or len(flips) > MAX_LISTED
    listed = fields["flipped_margins"]
    assert listed == sorted(listed, reverse=True), "the reference's most confident flips first"
    assert listed == pytest.approx([margins[i] for i in fields["flipped_windows"]])
    worst = max(margins[i] for i in flips)
    assert fields["flipped_margin_rank"] == pytest.approx(sum(m <= worst for m in margins) / n)
    assert fields["margin_median"] == pytest.approx(float(np.median(margins)))
    assert fields["interval"][0] < 1 - len(flips) / n < fields["interval"][1]


def test_many_flips_list_the_most_confident_and_count_all():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((300, 4))
    model = -ref  # every window flips
    fields = flip_fields(model, ref)
    margins = top2_margins(ref)
    assert fields["flipped"] == 300 and len(fields["flipped_windows"]) == MAX_LISTED
    assert fields["flipped_margins"][0] == pytest.approx(margins.max()) and fields["flipped_margin_rank"] == 1.0
    assert min(fields["flipped_margins"]) >= np.sort(margins)[-MAX_LISTED] - 1e-12


def test_no_flips():
    ref = np.eye(4)
    fields = flip_fields(ref, ref)
    assert fields["flipped"] == 0 and fields["flipped_windows"] == [] and fields["flipped_margin_rank"] is None
    text = summary(_agreement(windows=4, **fields))
    assert text.startswith("0 of 4 windows flip") and "margin" not in text


def test_flipped_rows_of_sequence_outputs_flip_where_any_position_differs():
    ref = np.asarray([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])  # (N=2, K=2, T=2)
    model = ref.copy()
    model[0, :, 1] = [1.0, 0.0]  # window 0, position 1 flips
    assert flipped_rows(model, ref).tolist() == [True, False]


def test_summary_says_how_sure_the_reference_was():
    model, ref = _logits(np.random.default_rng(0), 205, 6)
    fields = flip_fields(model, ref)
    text = summary(_agreement(**fields))
    lo, hi = fields["interval"]
    assert text.startswith(f"{fields['flipped']} of 205 windows flip (95% interval of the agreement {lo:.4f}-{hi:.4f})")
    assert f"at most {fields['flipped_margins'][0]:.3g}" in text
    assert f"{100 * fields['flipped_margin_rank']:.1f}% least confident" in text


def _agreement(windows: int = 205, **flips) -> Agreement:
    return Agreement("watch", "target-test", windows, 0.98, 0.99, 0.9, 0.91, 0.9, 0.91, False, (), **flips)


def test_flips_read_back_from_verify_json(tmp_path):
    model, ref = _logits(np.random.default_rng(5), 205, 6)
    ag = _agreement(**flip_fields(model, ref))
    report = VerifyReport("r.onnx", "m.onnx", None, 1, 1, 0, {}, False, "i.json", "o.json", agreement=ag)
    write_verify_report(tmp_path / "verify.json", report)
    assert read_verify_report(tmp_path / "verify.json").agreement == ag


def test_reports_written_before_flips_read_with_none_recorded(tmp_path):
    ag = _agreement(**flip_fields(*_logits(np.random.default_rng(6), 205, 6)))
    report = VerifyReport("r.onnx", "m.onnx", None, 1, 1, 0, {}, False, "i.json", "o.json", agreement=ag).to_dict()
    for name in FLIP_FIELDS:
        del report["agreement"][name]
    (tmp_path / "verify.json").write_text(json.dumps(report))
    back = read_verify_report(tmp_path / "verify.json").agreement
    assert back is not None and back.flipped == 0 and back.interval == [] and back.flipped_margin_rank is None
    assert back.top1_agreement == ag.top1_agreement


@pytest.mark.parametrize("field, bad", [("flipped", "3"), ("interval", 0.9), ("margin_median", "x")])
def test_a_flip_field_of_the_wrong_kind_is_refused(tmp_path, field, bad):
    from toolchain.core.errors import ToolchainError

    ag = _agreement(**flip_fields(*_logits(np.random.default_rng(7), 205, 6)))
    report = VerifyReport("r.onnx", "m.onnx", None, 1, 1, 0, {}, False, "i.json", "o.json", agreement=ag).to_dict()
    report["agreement"][field] = bad
    (tmp_path / "verify.json").write_text(json.dumps(report))
    with pytest.raises(ToolchainError, match=field):
        read_verify_report(tmp_path / "verify.json")
