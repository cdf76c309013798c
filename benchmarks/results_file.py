"""What the accuracy benchmarks share: a worker pool for their runs, RESULTS.md sections, ``--set`` values."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")


def run_pool(run: Callable[[Any], dict], jobs: Iterable[Any], workers: int, line: Callable[[Any, dict], str]) -> list:
    """``run(job)`` for every job on ``workers`` processes, started in the order given; prints
    ``line(job, result)`` as each run ends and returns the results in the order they ended."""
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        running: dict[Future, Any] = {pool.submit(run, job): job for job in jobs}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                result = future.result()
                results.append(result)
                print(line(job, result), flush=True)
    return results


def write_section(tag: str, lines: list[str]) -> None:
    """Replace the RESULTS.md section between ``<!-- tag -->`` and ``<!-- /tag -->``, or append it."""
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    body = "\n".join([start, *lines, end])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    RESULTS.write_text(text)


def parse_value(text: str) -> Any:
    """A ``--set FIELD=VALUE`` value: JSON where it parses (numbers, booleans, lists), Python's
    ``True`` / ``False`` / ``None``, else the string."""
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
