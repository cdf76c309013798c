"""The example and the README's commands, as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("style", [[], ["--own-loop"]])
def test_minimal_example_trains(style):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "minimal.py"), "--epochs", "2", *style],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(rows) == 2
    losses = [float(row[1]) for row in rows]
    student = [float(row[6].rstrip("%")) for row in rows]
    assert losses[1] < losses[0]
    assert student[-1] > 60.0  # well above chance (10%) despite 40% noisy labels


def test_readme_starts_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)\n```", readme, flags=re.S)
    install_and_run, tests = commands[0].strip(), commands[1].strip()
    assert "pip install '.[dev]'" in install_and_run and "examples/" in install_and_run
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet '.[dev,docs]'" in ci  # the dev extra, and MkDocs for the docs build
    # exactly the README's test command, then the slowest runs it leaves out (pytest.mark.slow)
    assert [line.strip() for line in ci.rstrip().splitlines()[-2:]] == [tests, f"{tests} -m slow"]
    # The two commands come before any other section of the README.
    assert readme.index(tests) < readme.index("\n## ")
