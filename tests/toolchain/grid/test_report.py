"""The report's paired measures, on rows whose answers are known by construction."""

import pytest

from toolchain.grid.report import claims, coverage_table, reach, summarise, write_report


def row(method, curve, user=1, seed=0, rank=0, frac=0.01, shift="s", backbone="b"):
    steps = [10 * i for i in range(len(curve))]
    return {
        "shift": shift,
        "backbone": backbone,
        "method": method,
        "rank": rank,
        "seed": seed,
        "user": user,
        "trainable_fraction": frac,
        "f1_start": curve[0],
        "f1_final": curve[-1],
        "history": [[s, f] for s, f in zip(steps, curve, strict=True)],
        "history_seconds": [0.5 * s for s in steps],
    }


@pytest.mark.parametrize(
    ("curve", "target", "expected"),
    [
        ([0.1, 0.5, 0.9], 0.5, (10, 5.0)),
        ([0.1, 0.5, 0.9], 0.91, (None, None)),
        ([0.95, 0.2], 0.9, (0, 0.0)),
        ([0.1, 0.3, 0.6, 0.6], 0.6, (20, 10.0)),
    ],
)
def test_reach_is_the_first_evaluation_at_the_target(curve, target, expected):
    assert reach(row("m", curve), target) == expected


def test_speedup_and_gap_are_paired_per_user():
    rows = [
        row("full", [0.1, 0.3, 0.5, 0.8, 1.0], user=1, frac=1.0),  # 95% of 1.0 reached at step 40
        row("lora-edge", [0.1, 0.96, 0.97, 0.97, 0.97], user=1, rank=4),  # at step 10: 4x faster
        row("full", [0.1, 0.2, 0.5], user=2, frac=1.0),  # 95% of 0.5 first reached at 20
        row("lora-edge", [0.1, 0.2, 0.4], user=2, rank=4),  # never reaches 0.475
    ]
    (edge,) = [x for x in summarise(rows) if x["method"] == "lora-edge"]
    assert edge["runs"] == 2 and edge["reached_95"] == 0.5
    assert edge["speedup_steps_95"] == pytest.approx(4.0) and edge["speedup_seconds_95"] == pytest.approx(4.0)
    assert edge["gap_points"] == pytest.approx(100 * ((1.0 - 0.97) + (0.5 - 0.4)) / 2)
    assert edge["f1"] == pytest.approx((0.97 + 0.4) / 2) and edge["trained_pct"] == pytest.approx(1.0)
    text = claims(summarise(rows))
    assert "params held, accuracy not held, speed held" in text


def test_a_run_without_its_full_fine_tuning_pair_is_left_out_and_coverage_says_so(tmp_path):
    rows = [
        row("full", [0.1, 0.9], user=1, frac=1.0),
        row("lora-edge", [0.1, 0.9], user=1, rank=2),
        row("lora-edge", [0.1, 0.9], user=2, rank=2),
    ]
    (edge,) = [x for x in summarise(rows) if x["method"] == "lora-edge"]
    assert edge["runs"] == 1, "user 2 has no full fine-tuning run to compare with"
    assert "| s | b | 0 | 2 | 2 | 3 | no (1 missing) |" in coverage_table(rows)
    write_report(rows, tmp_path / "r")
    assert (tmp_path / "r" / "f1_s.png").stat().st_size > 0 and "LoRA-Edge claims" in (
        tmp_path / "r" / "summary.md"
    ).read_text()


def test_pivot_puts_each_method_in_its_column():
    from toolchain.grid.report import pivot

    rows = [row("full", [0.2, 0.8], frac=1.0), row("lora-edge", [0.2, 0.7], rank=4), row("head", [0.2, 0.6])]
    table = pivot(summarise(rows), "f1", source=True).splitlines()
    assert table[0] == "| shift | backbone | source-only | lora-edge r4 | head | full |"
    assert table[2] == "| s | b | 0.200 | 0.700 | 0.600 | 0.800 |"
