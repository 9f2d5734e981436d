"""Code hygiene as tests, so the README's one test command checks it: ruff, snakefmt and snakemake --lint."""

import subprocess
import sys

import pytest
from workflow_utils import ROOT


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check():
    r = _run(sys.executable, "-m", "ruff", "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format():
    r = _run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_snakefmt():
    r = _run("snakefmt", "--check", "Snakefile", "rules")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_snakemake_lint():
    r = _run(sys.executable, "-m", "snakemake", "--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr
