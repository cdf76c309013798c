"""Two real processes (gloo on CPU) through `accelerate launch --multi_gpu --num_processes 2`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(script: Path, *args: str, num_processes: int = 2) -> list[str]:
    """The ``accelerate launch`` command line for ``script`` on CPU processes (gloo)."""
    processes = ["--multi_gpu", "--num_processes", "2"] if num_processes == 2 else ["--num_processes", "1"]
    options = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    port = ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *processes, *options, *port, str(script), *args]


def launch(script: Path, *args: str, num_processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` ``script``; the test fails with the ranks' output if it does not exit 0."""
    command = launch_command(script, *args, num_processes=num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("ddp") / "results.json"
    launch(TESTS / "ddp_worker.py", str(path))
    return json.loads(path.read_text())


def test_two_processes_really_ran(ddp_results):
    assert ddp_results["num_processes"] == 2
    assert ddp_results["distributed_type"] == "DistributedType.MULTI_CPU"


@pytest.mark.parametrize("run", ["step_reduce", "step_broadcast", "step_first_order", "step_kl_sized", "own_loop"])
def test_ranks_hold_bitwise_identical_student_and_mentor(ddp_results, run):
    """After several meta steps on different data per rank: parameters, BatchNorm buffers, mentor."""
    assert ddp_results[f"{run}_identical"] is True


def test_meta_weight_zero_two_half_batches_match_one_full_batch(ddp_results):
    assert ddp_results["half_batch_max_difference"] < 1e-6


def test_accumulation_over_ranks_by_step_matches_ddp_own_loop(ddp_results):
    """`step` (own all-reduce) and an own loop through DDP's reducer (no_sync windows) agree."""
    assert ddp_results["accumulation_updates"] == [2, 2]
    assert ddp_results["accumulation_identical"] is True
    assert ddp_results["accumulation_paths_max_difference"] < 1e-5


# ------------------------------------------------------------------------------- faults


def launch_expecting_failure(script: Path, *args: str, timeout: int = 240) -> tuple[subprocess.CompletedProcess, float]:
    command = launch_command(script, *args)
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return result, time.monotonic() - started


def test_a_rank_that_fails_alone_takes_the_others_down_instead_of_hanging():
    result, seconds = launch_expecting_failure(TESTS / "ddp_fault_worker.py", "raise")
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert seconds < 180  # (the subprocess timeout of 240 s would have raised on a hang)


@pytest.mark.slow
def test_a_stalled_rank_stops_the_run_after_the_rank_timeout(tiny_mnist, tmp_path):
    """Rank 1 stops answering at the first validation: rank 0 gives up after --rank-timeout, in one line."""
    flags = ["--dataset", str(tiny_mnist), "--model", "test_resnet", "--img-size", "32", "--batch-size", "32"]
    flags += ["--epochs", "1", "--first-order", "--num-synthetic", "2", "--num-neighbors", "4", "--val-fraction", "0.2"]
    flags += ["--rank-timeout", "5", "--output-dir", str(tmp_path / "run")]
    result, seconds = launch_expecting_failure(TESTS / "ddp_stall_worker.py", *flags)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 0 of 2: another rank stopped answering for --rank-timeout 5 s or went away" in output, output[-3000:]
    assert seconds < 180  # the stalled rank sleeps an hour


def test_a_killed_rank_stops_the_other_within_the_rank_timeout(tiny_mnist, tmp_path):
    """Rank 1 dies (SIGKILL) at the first validation: rank 0 stops too, well within --rank-timeout."""
    flags = ["--dataset", str(tiny_mnist), "--model", "test_resnet", "--img-size", "32", "--batch-size", "32"]
    flags += ["--epochs", "1", "--first-order", "--num-synthetic", "2", "--num-neighbors", "4", "--val-fraction", "0.2"]
    flags += ["--rank-timeout", "60", "--output-dir", str(tmp_path / "run")]
    command = launch_command(TESTS / "ddp_stall_worker.py", *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_FAULT": "kill"}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # The launcher names the rank that died; rank 0 either gives up on the closed connection with
    # our one line (naming the checkpoint to resume from) or is ended by the launcher first.
    root_cause = output.rpartition("Root Cause")[2]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", root_cause), output[-3000:]
    assert seconds < 60, seconds  # within --rank-timeout: nobody waited for it


def test_ranks_holding_different_weights_are_detected():
    result, _ = launch_expecting_failure(TESTS / "ddp_fault_worker.py", "diverge")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ranks hold different weights" in output
    assert output.count("ranks hold different weights") >= 2  # raised on both ranks
