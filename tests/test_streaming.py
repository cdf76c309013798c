"""``--streaming``: the training split read as a stream, each rank its own shards, resumed without repeats.

The stream is built from the embedded digits: a parquet data set whose training split is two
files (two shards), beside validation and test files.
"""

from __future__ import annotations

import hashlib
import signal

import pytest
from datasets import load_from_disk
from test_preemption import assert_same_run, newest_checkpoint, position, run, succeeded

from noisy_meta.finetune.data import open_stream, parquet_files_by_split

STREAMING = ["--streaming", "--val-split", "validation", "--shuffle-buffer", "64"]


@pytest.fixture(scope="module")
def parquet_digits(tiny_mnist, tmp_path_factory):
    """256 training digits in two parquet files, 64 validation and 100 test digits in one each."""
    data = load_from_disk(str(tiny_mnist))
    root = tmp_path_factory.mktemp("stream") / "digits"
    root.mkdir()
    train = data["train"].select(range(64, 320))
    train.select(range(128)).to_parquet(str(root / "train-00000.parquet"))
    train.select(range(128, 256)).to_parquet(str(root / "train-00001.parquet"))
    data["train"].select(range(64)).to_parquet(str(root / "validation.parquet"))
    data["test"].to_parquet(str(root / "test.parquet"))
    return root


def fingerprints(stream) -> list[str]:
    return [hashlib.sha1(example["image"].tobytes()).hexdigest() + str(example["label"]) for example in stream]


def test_each_rank_reads_its_own_shard_and_together_they_read_everything(parquet_digits):
    assert sorted(parquet_files_by_split(str(parquet_digits))) == ["test", "train", "validation"]
    whole, rows, shards = open_stream(str(parquet_digits), "train")
    parts = [open_stream(str(parquet_digits), "train", rank, 2) for rank in (0, 1)]
    assert (rows, shards) == (256, 2) and all(part[1:] == (256, 2) for part in parts)
    first, second = (fingerprints(part[0]) for part in parts)
    assert len(first) == len(second) == 128 and not set(first) & set(second)
    assert sorted(first + second) == sorted(fingerprints(whole))


@pytest.mark.slow
def test_a_streamed_run_killed_mid_epoch_resumes_bitwise_with_or_without_loader_workers(parquet_digits, tmp_path):
    reference = tmp_path / "reference"
    result = succeeded(run(parquet_digits, reference, *STREAMING))
    assert "train: a stream of 256 images" in result.stdout
    killed_at = 5  # after the step checkpoint at update 3 (batch 3 of 8), before the one at 6
    output = tmp_path / "killed"
    workers = ["--workers", "2"]  # loader workers decode: the same batches, the same resume, as without
    killed = run(parquet_digits, output, *STREAMING, *workers, signal_at=f"{killed_at}:KILL")
    assert killed.returncode == -signal.SIGKILL
    assert position(output)["updates"] == newest_checkpoint(killed_at, 1) == 3 and position(output)["batch"] == 3
    resumed = succeeded(run(parquet_digits, output, *STREAMING, *workers, "--resume"))
    assert "at epoch 1, batch 4 (after update 3)" in resumed.stdout
    assert_same_run(output, reference)


def test_two_processes_stream_their_own_shards_and_a_signal_to_one_rank_stops_both(parquet_digits, tmp_path):
    """Only rank 1 is signalled: the ranks agree, both write their part of one checkpoint and stop."""
    output = tmp_path / "two"
    stopped = run(parquet_digits, output, *STREAMING, processes=2, signal_at="1:TERM:1")
    assert "train: a stream of 256 images in 2 shards (each process its own)" in stopped.stdout
    assert stopped.stderr.count("stopped by SIGTERM after update 2") == 2, stopped.stderr[-3000:]
    assert position(output)["batch"] == 2 and position(output)["updates"] == 2
    assert {p.name for p in (output / "last").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
