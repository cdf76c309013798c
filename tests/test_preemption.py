"""Step checkpoints, mid-epoch resume and stopping on a signal, in one and two processes.

Each run is the real command line (`tests/signal_worker.py`), killed or signalled at a random
update; the resumed run must end bitwise equal to a run never interrupted (CPU, float32),
random augmentation included.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import launch_command

from noisy_meta.finetune.checkpoint import EXIT_STOPPED, StopSignals

from finetune_helpers import FAST, flat_tensors, metrics, without_timings

TESTS = Path(__file__).parent
WORKER = TESTS / "signal_worker.py"
FLAGS = [*FAST, "--aug", "--seed", "7", "--checkpoint-every", "3", "--keep-checkpoints", "2"]
#: 256 training digits in batches of 32: updates per epoch with one and with two processes.
UPDATES_PER_EPOCH = {1: 8, 2: 4}


def run(data: Path, output: Path, *extra: str, processes: int = 1, signal_at: str | None = None, stamp=None):
    """The worker on ``data`` into ``output``; returns the finished process (any exit status)."""
    flags = ["--dataset", str(data), "--output-dir", str(output), *FLAGS, *extra]
    command = launch_command(WORKER, *flags) if processes == 2 else [sys.executable, str(WORKER), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes == 2 else "2"}
    env.pop("SIGNAL_AT", None)
    if signal_at is not None:
        env["SIGNAL_AT"] = signal_at
    if stamp is not None:
        env["SIGNAL_STAMP"] = str(stamp)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def position(output: Path) -> dict:
    return json.loads((output / "last" / "position.json").read_text())


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Metrics (but timings), student, mentor, Accelerate's model copy, optimizer state and the label-error report
    (its margins summed over the ranks at every checkpoint) are bitwise equal."""
    assert without_timings(metrics(resumed)) == without_timings(metrics(reference))
    issues = [run / "label_issues.csv" for run in (resumed, reference)]
    assert issues[0].exists() == issues[1].exists()  # none for a stream
    assert not issues[1].exists() or issues[0].read_text() == issues[1].read_text()
    for name in ("student.safetensors", "mentor.safetensors", "model.safetensors"):
        ours, theirs = load_file(str(resumed / "last" / name)), load_file(str(reference / "last" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items()), name
    optimizers = [torch.load(run / "last" / "optimizer.bin", weights_only=False) for run in (resumed, reference)]
    for ours, theirs in zip(*(flat_tensors(state) for state in optimizers), strict=True):
        assert torch.equal(ours, theirs)


def newest_checkpoint(update: int, processes: int, every: int = 3) -> int:
    """The update of the newest checkpoint once ``update`` updates are done (step or epoch end)."""
    per_epoch = UPDATES_PER_EPOCH[processes]
    return max(update // every * every, update // per_epoch * per_epoch)


def mid_epoch_update(processes: int) -> int:
    """A random update after which the newest checkpoint is a mid-epoch (step) one."""
    per_epoch = UPDATES_PER_EPOCH[processes]
    return random.choice([k for k in range(1, 2 * per_epoch) if newest_checkpoint(k, processes) % per_epoch])


@pytest.fixture(scope="module")
def reference(tiny_mnist, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("preemption") / "reference"
    succeeded(run(tiny_mnist, output))
    return output


@pytest.fixture(scope="module")
def two_process_reference(tiny_mnist, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("preemption") / "reference-2"
    succeeded(run(tiny_mnist, output, processes=2))
    return output


def test_step_checkpoints_are_written_and_only_the_newest_kept(reference):
    """--checkpoint-every 3 over 16 updates, --keep-checkpoints 2: last/ and the one it replaced."""
    assert position(reference) | {"written": None, "flags": None} == {
        "epoch": 2,
        "batch": 0,
        "updates": 16,
        "reason": "epoch end",
        "written": None,
        "flags": None,
    }
    kept = [path.name for path in (reference / "checkpoints").iterdir()]
    assert kept == ["update_15"]
    assert json.loads((reference / "checkpoints" / "update_15" / "position.json").read_text())["batch"] == 7


def test_a_run_killed_at_a_random_update_resumes_mid_epoch_bitwise(tiny_mnist, tmp_path, reference):
    killed_at = mid_epoch_update(1)
    output = tmp_path / "killed"
    result = run(tiny_mnist, output, signal_at=f"{killed_at}:KILL")
    assert result.returncode == -signal.SIGKILL, f"killed at update {killed_at}"
    saved = position(output)
    assert saved["batch"] > 0 and saved["updates"] == newest_checkpoint(killed_at, 1), (killed_at, saved)

    resumed = succeeded(run(tiny_mnist, output, "--resume"))
    epoch, batch = divmod(saved["updates"], UPDATES_PER_EPOCH[1])
    assert f"at epoch {epoch + 1}, batch {batch + 1} (after update {saved['updates']})" in resumed.stdout
    assert_same_run(output, reference)


def test_sigterm_finishes_the_update_writes_a_checkpoint_and_exits_75(tiny_mnist, tmp_path, reference):
    signalled_at = random.choice([k for k in range(1, 15) if (k + 1) % UPDATES_PER_EPOCH[1]])
    output, stamp = tmp_path / "stopped", tmp_path / "stamp"
    result = run(tiny_mnist, output, signal_at=f"{signalled_at}:TERM", stamp=stamp)
    ended = time.time()
    assert result.returncode == EXIT_STOPPED, result.stdout[-3000:] + result.stderr[-3000:]
    last = output / "last"
    assert (
        f"stopped by SIGTERM after update {signalled_at + 1}; the checkpoint is {last}/, run the same command "
        "with --resume to continue from it" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert ended - float(stamp.read_text()) < 30  # one update, one checkpoint and the interpreter's exit
    assert position(output)["updates"] == signalled_at + 1 and position(output)["reason"] == "stopped by SIGTERM"

    succeeded(run(tiny_mnist, output, "--resume"))
    assert_same_run(output, reference)


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_bitwise(tiny_mnist, tmp_path, two_process_reference):
    killed_at = mid_epoch_update(2)
    output = tmp_path / "killed-2"
    result = run(tiny_mnist, output, processes=2, signal_at=f"{killed_at}:KILL:1")
    assert result.returncode != 0, f"rank 1 was to be killed at update {killed_at}"
    saved = position(output)
    assert saved["batch"] > 0 and saved["updates"] == newest_checkpoint(killed_at, 2), (killed_at, saved)

    resumed = run(tiny_mnist, output, "--resume", processes=2)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_same_run(output, two_process_reference)


# ------------------------------------------------------------------------------- the signal handler


def test_a_second_signal_ends_the_process_at_once_and_a_repeat_in_the_window_does_not(tmp_path):
    script = (
        "import os, signal, time\n"
        "from noisy_meta.finetune import checkpoint as preemption\n"
        "preemption.REPEAT_WINDOW_S = float(os.environ['WINDOW'])\n"
        "with preemption.StopSignals() as signals:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('first:', signals.received, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('still running', flush=True)\n"
    )

    def run_script(window: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "WINDOW": window}
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)

    at_once = run_script("0")
    assert at_once.returncode == -signal.SIGINT and f"first: {int(signal.SIGINT)}" in at_once.stdout
    assert "still running" not in at_once.stdout
    repeated = run_script("60")  # the launcher forwarding what the terminal already sent
    assert repeated.returncode == 0 and "still running" in repeated.stdout


def test_stop_signals_restore_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert signal.getsignal(signal.SIGTERM) == signals._handle
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
