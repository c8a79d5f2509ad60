"""Property tests (hypothesis, bounded for CI): PEFT configs and cache records of any shape are
either accepted or refused with a ToolchainError, never another exception, never trusted blindly."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.core.errors import ToolchainError
from toolchain.core.jsonio import loads_strict
from toolchain.graphs.peft import _check_config
from toolchain.grid.runner import Task, read_record, write_record

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
PATTERN_KEYS = st.text(alphabet="ab.*+?()[]|\\^$conv0123", max_size=14)
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@BOUNDED
@given(
    r=JSON,
    alpha=JSON,
    patterns=st.dictionaries(PATTERN_KEYS, JSON, max_size=4) | JSON,
    ranks=st.dictionaries(PATTERN_KEYS, JSON, max_size=3) | JSON,
)
def test_any_peft_config_is_accepted_or_refused_in_one_line(r, alpha, patterns, ranks):
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "alpha_pattern": patterns, "rank_pattern": ranks}
    try:
        _check_config(config)
    except ToolchainError as err:
        assert "\n" not in str(err)
        return
    assert type(r) is int and r >= 1 and type(alpha) in (int, float)
    for table in (patterns, ranks):
        assert table is None or isinstance(table, dict)


@BOUNDED
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin1")))
def test_any_text_parses_strictly_or_is_refused(text):
    try:
        loads_strict(text, "a test document", "fix it")
    except ToolchainError:
        pass


@BOUNDED
@given(
    record=st.dictionaries(
        st.sampled_from(["format", "fn", "inputs", "status", "result", "files", "digest", "seconds"]), JSON, max_size=8
    )
)
def test_no_forged_cache_record_is_trusted(tmp_path_factory, record):
    d = tmp_path_factory.mktemp("rec")
    task = Task("tests.toolchain.grid.fns:square", {"x": 3})
    path = Path(d) / "r.json"
    path.write_text(json.dumps(record))
    assert read_record(path, task) is None  # only write_record's own records (with their digest) are trusted
    write_record(path, task, {"result": {"x": 3, "y": 9}})
    assert read_record(path, task) == {"x": 3, "y": 9}
