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


@pytest.mark.parametrize("deferred", [True, False])
def test_a_deferred_termination_stops_a_single_file_publication(tmp_path, deferred):
    """``atomic_path`` (every model, checkpoint and engine write) runs the same guard."""
    from toolchain.core.fileio import atomic_path

    BEFORE_PUBLISH.append(cli._before_publish)
    try:
        cli._DEFERRED[:] = [True] if deferred else []
        if deferred:
            with pytest.raises(cli.Terminated), atomic_path(tmp_path / "model.onnx") as tmp:
                tmp.write_bytes(b"x")
        else:
            with atomic_path(tmp_path / "model.onnx") as tmp:
                tmp.write_bytes(b"x")
    finally:
        BEFORE_PUBLISH.remove(cli._before_publish)
        cli._DEFERRED.clear()
    assert [p.name for p in tmp_path.iterdir()] == ([] if deferred else ["model.onnx"])


def test_a_termination_still_deferred_when_the_command_ends_is_not_exit_0(monkeypatch, capsys):
    """A SIGTERM that arrived in third-party code after the last publish: main exits 143, never 0."""

    def handler(args):
        cli._DEFERRED[:] = [True]  # as _on_sigterm leaves it inside third-party code
        return 0

    parser = cli.build_parser()
    parse = parser.parse_args

    def parse_args(argv):
        args = parse(argv)
        args.func = handler
        return args

    monkeypatch.setattr(parser, "parse_args", parse_args)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["diff", "a.onnx", "b.onnx"]) == 143
    assert "terminated" in capsys.readouterr().err
