"""A SIGTERM that had to wait (it arrived inside third-party code, e.g. Polygraphy writing the staged
verify files) is raised before ``atomic_paths`` publishes: none of the files appear, never all of them
with exit 143. (The race R9 showed under load; here it is forced.)"""

from __future__ import annotations

import pytest

from toolchain import cli
from toolchain.core.fileio import BEFORE_PUBLISH, atomic_paths


@pytest.mark.parametrize("deferred", [True, False])
def test_a_deferred_termination_stops_publication(tmp_path, deferred):
    targets = [tmp_path / n for n in ("verify.json", "inputs.json", "outputs.json")]
    BEFORE_PUBLISH.append(cli._before_publish)
    try:
        cli._DEFERRED[:] = [True] if deferred else []
        if deferred:
            with pytest.raises(cli.Terminated), atomic_paths(targets) as tmps:
                for t in tmps:
                    t.write_text("{}")
        else:
            with atomic_paths(targets) as tmps:
                for t in tmps:
                    t.write_text("{}")
    finally:
        BEFORE_PUBLISH.remove(cli._before_publish)
        cli._DEFERRED.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if deferred else sorted(t.name for t in targets))
