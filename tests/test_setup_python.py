"""scripts/setup.sh refuses a Python older than 3.11 before it creates or installs anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"


def _check(python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(SETUP), "--check-python"], capture_output=True, text=True, env=env, timeout=30)


def _fake_python(tmp_path: Path, version: str) -> str:
    """An executable that answers setup.sh's version question as Python ``version`` would."""
    fake = tmp_path / f"python{version}"
    fake.write_text(f"#!/bin/sh\necho {version}\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("version", ["3.10", "3.9", "2.7"])
def test_older_python_is_refused_in_one_line(version, tmp_path):
    proc = _check(_fake_python(tmp_path, version))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"is {version}" in lines[0] and "Python 3.11 or newer" in lines[0]
    assert "PYTHON=python3.11 make demo" in lines[0]


def test_missing_python_is_refused(tmp_path):
    proc = _check(str(tmp_path / "no-such-python"))
    assert proc.returncode == 1 and "not a working Python" in proc.stderr and "PYTHON=python3.11" in proc.stderr


@pytest.mark.parametrize("version", ["3.11", "3.13", "4.0"])
def test_new_enough_python_passes(version, tmp_path):
    proc = _check(_fake_python(tmp_path, version))
    assert proc.returncode == 0, proc.stderr


def test_this_python_passes():
    proc = _check(sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""
