"""run_stage: the project's own input and config errors read as one line; anything else keeps its traceback."""

from types import SimpleNamespace

import pytest

from fewseg.config import ConfigError
from fewseg.io import InputError
from fewseg.stages import run_stage


def _job(tmp_path):
    return SimpleNamespace(input=[], output=[], params={}, threads=1, log=[str(tmp_path / "job.log")], rule="demo_rule")


@pytest.mark.parametrize(
    "error", [InputError("/data/a.tif", "truncated file"), ConfigError("base_training/lr: not a number")]
)
def test_input_and_config_errors_are_one_line_and_exit_1(error, tmp_path, capsys):
    def stage(input, output, params, progress=None):
        raise error

    with pytest.raises(SystemExit) as info:
        run_stage(_job(tmp_path), stage)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"fewseg error: demo_rule: {error}\n"
    assert "Traceback" not in (tmp_path / "job.log").read_text()


def test_an_internal_bug_keeps_its_traceback(tmp_path, capsys):
    def stage(input, output, params, progress=None):
        return int("not a number")  # a ValueError from a bug, not from the user's input

    with pytest.raises(ValueError, match="invalid literal"):
        run_stage(_job(tmp_path), stage)
    assert "fewseg error" not in capsys.readouterr().err
    log = (tmp_path / "job.log").read_text()
    assert "Traceback" in log and "invalid literal" in log


def test_several_problems_print_one_prefixed_line_each(tmp_path, capsys):
    def stage(input, output, params, progress=None):
        raise InputError(None, "2 problems in the input data:\n  a.tif: truncated\n  b.tif: 1 band")

    with pytest.raises(SystemExit):
        run_stage(_job(tmp_path), stage)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["fewseg error: demo_rule: 2 problems in the input data:", "fewseg error:   a.tif: truncated",
                     "fewseg error:   b.tif: 1 band"]  # fmt: skip
