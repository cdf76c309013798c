"""Whole `examples/finetune.py` runs: the layout, the baseline, two processes, iterative training, non-finite steps."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from test_distributed import launch

from noisy_meta.finetune import main
from noisy_meta.finetune.data import collate, prepare_splits
from noisy_meta.labels.cleaning import CleaningConfig, find_label_issues

from finetune_helpers import EXAMPLE, FAST, metrics, run_example, split_args

# ------------------------------------------------------------------------------- runs


def test_single_process_run_writes_the_documented_layout(tiny_mnist, tmp_path):
    output = tmp_path / "run"
    result = launch(
        EXAMPLE,
        "--dataset",
        str(tiny_mnist),
        "--output-dir",
        str(output),
        *FAST,
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.4",
        num_processes=1,
    )
    assert "realised" in result.stdout and "clean-test accuracy" in result.stdout
    records = metrics(output)
    assert [r["epoch"] for r in records] == [1, 2]  # as the table counts them
    for key in (
        "train_loss",
        "train_ce_loss",
        "train_meta_loss",
        "meta_weight",
        "val_student",
        "val_mentor",
        "test_student",
        "test_mentor",
        "num_skipped",
        "lr",
    ):
        assert key in records[-1], key
    assert records[-1]["meta_weight"] > 0  # the meta step ran
    for folder in ("last", "best"):
        names = {p.name for p in (output / folder).iterdir()}
        assert {"student.safetensors", "mentor.safetensors", "model.safetensors", "optimizer.bin"} <= names, names
    # plain state dicts timm loads; last/student equals Accelerate's own copy of the model
    student = timm.create_model(
        "test_resnet", num_classes=10, checkpoint_path=str(output / "last" / "student.safetensors")
    )
    saved = load_file(str(output / "last" / "model.safetensors"))
    for name, value in student.state_dict().items():
        assert torch.equal(value, saved[name]), name
    mentor = load_file(str(output / "last" / "mentor.safetensors"))
    assert mentor.keys() == saved.keys() and any(not torch.equal(mentor[k], saved[k]) for k in saved)


def test_no_meta_is_the_cross_entropy_baseline(tiny_mnist, tmp_path):
    output = tmp_path / "baseline"
    run_example("--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, "--no-meta")
    assert all(r["meta_weight"] == 0.0 and r["train_meta_loss"] == 0.0 for r in metrics(output))


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output-dir", str(tmp_path / "nothing"), "--resume", *FAST],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "--resume: no checkpoint directory" in result.stderr


def test_two_process_run(tiny_mnist, tmp_path):
    output = tmp_path / "ddp"
    result = launch(EXAMPLE, *iterative_flags(tiny_mnist, output, "--clean-action", "relabel"))
    assert result.stdout.count("clean-test accuracy") == 2  # the main process prints (once per iteration)
    records = metrics(output / "iteration_1")
    assert len(records) == 1 and records[0]["updates"] == 256 // (2 * 32)  # 256 training digits over 2 ranks
    check_iterative_run(tiny_mnist, output, CleaningConfig(action="relabel"))


# ------------------------------------------------------------------------------- iterative training

ITERATIVE = ["--noise", "symmetric", "--noise-rate", "0.4", "--iterations", "2", "--export-pred-probs"]


def iterative_flags(data_dir: Path, output: Path, *extra: str) -> list[str]:
    """A one-epoch, 2-iteration run of ``data_dir`` into ``output`` (FAST + ITERATIVE), then ``extra``."""
    return ["--dataset", str(data_dir), "--output-dir", str(output), *FAST, "--epochs", "1", *ITERATIVE, *extra]


def check_iterative_run(data_dir: Path, output: Path, config: CleaningConfig) -> None:
    """The layout, the cleaning and the mentor hand-over of a 2-iteration run made with FAST + ITERATIVE."""
    for iteration in (1, 2):
        assert {"last", "best", "metrics.jsonl"} <= {p.name for p in (output / f"iteration_{iteration}").iterdir()}
    judged = np.load(output / "iteration_2" / "pred_probs.npz")
    report = json.loads((output / "iteration_2" / "cleaning.json").read_text())
    assert report["config"] == dataclasses.asdict(config)

    # The judge is iteration 1's best mentor, applied to every training sample (eval transform).
    splits = prepare_splits(
        load_from_disk(str(data_dir)), **split_args(noise="symmetric", noise_rate=0.4, val_fraction=0.2)
    )
    mentor = timm.create_model(
        "test_resnet", num_classes=10, checkpoint_path=str(output / "iteration_1" / "best" / "mentor.safetensors")
    ).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=mentor))
    train = splits.train
    assert np.array_equal(judged["labels"], np.asarray(train["label"])) and np.array_equal(
        judged["index"], np.asarray(train["index"])
    )
    with torch.no_grad():
        rows = [0, len(train) // 2, len(train) - 1]
        images = torch.stack([transform(train[i]["image"].convert("RGB")) for i in rows])
        np.testing.assert_allclose(judged["pred_probs"][rows], torch.softmax(mentor(images), dim=1).numpy(), atol=1e-5)

    flagged = find_label_issues(judged["labels"], judged["pred_probs"], config=config)
    noisy = np.asarray(train["is_noisy"])
    assert report["detection"]["num_flagged"] == int(flagged.sum()) and report["detection"]["num_noisy"] == int(
        noisy.sum()
    )
    assert report["detection"]["recall"] == pytest.approx((flagged & noisy).sum() / noisy.sum())
    kept = len(train) - int(flagged.sum()) if config.action == "remove" else len(train)
    assert sum(report["remaining_per_class"]) == kept and metrics(output / "iteration_2")[-1]["train_samples"] == kept
    # --iteration-mentor frozen: iteration 2's mentor is iteration 1's best mentor, unchanged.
    previous = load_file(str(output / "iteration_1" / "best" / "mentor.safetensors"))
    final = load_file(str(output / "iteration_2" / "last" / "mentor.safetensors"))
    assert previous.keys() == final.keys() and all(torch.equal(previous[k], final[k]) for k in previous)
    exported = np.load(output / "pred_probs.npz")  # --export-pred-probs: the last iteration's best mentor
    assert exported["pred_probs"].shape == (len(train), 10) and np.allclose(exported["pred_probs"].sum(axis=1), 1)


@pytest.mark.slow
def test_iterative_training_single_process_and_resume_keeps_finished_iterations(tiny_mnist, tmp_path):
    output = tmp_path / "iterative"
    # Only confident disagreements are removed: a one-epoch mentor must not empty the data set.
    flags = iterative_flags(tiny_mnist, output, "--clean-threshold", "0.5")
    result = run_example(*flags)
    assert "iterative training" in result.stdout and "precision" in result.stdout
    check_iterative_run(tiny_mnist, output, CleaningConfig(threshold=0.5))
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*.safetensors")}
    resumed = run_example(*flags, "--resume")
    assert resumed.stdout.count("finished before: kept") == 2
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.safetensors")} == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--clean-criterion", "given_label_prob", "--clean-threshold", "0"],
            r"threshold must be a number in \(0, 1\]",
        ),
        (["--iterations", "2", "--resume", "somewhere/last"], "give it no directory"),
    ],
)
def test_iterative_flag_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        main([*FAST, *flags, "--output-dir", "/nonexistent/never-written"])


# ------------------------------------------------------------------------------- non-finite updates


def test_consecutive_non_finite_updates_stop_the_run_with_the_last_good_state(
    tiny_mnist, tmp_path, monkeypatch, make_accelerator
):
    """Poisoned (NaN) batches after two good ones: skipped, counted, and after 3 the run stops."""
    from noisy_meta.finetune import data, trainer

    seen = []

    def poisoned(samples):
        batch = collate(samples)
        if len(samples) == 32:  # training batches (evaluation uses 64)
            seen.append(1)
            if len(seen) > 2:
                batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    monkeypatch.setattr(data, "collate", poisoned)
    output = tmp_path / "poisoned"
    good_states = []
    step = trainer.MetaNoiseWrapper.step

    def recording_step(self, inputs, targets):
        stats = step(self, inputs, targets)
        if not stats["skipped"]:
            good_states.append({k: v.clone() for k, v in self.module.state_dict().items()})
        return stats

    monkeypatch.setattr(trainer.MetaNoiseWrapper, "step", recording_step)
    with pytest.raises(
        trainer.NonFiniteTrainingError,
        match=r"3 consecutive updates were skipped .* after 2 good updates; 3 skipped",
    ):
        main(["--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, "--max-consecutive-skips", "3"])
    assert len(good_states) == 2
    stopped = load_file(str(output / "stopped" / "student.safetensors"))
    for name, value in good_states[-1].items():  # bitwise the state after the last good update
        assert torch.equal(stopped[name], value), name
    mentor = load_file(str(output / "stopped" / "mentor.safetensors"))
    assert all(torch.isfinite(t).all() for t in mentor.values() if t.is_floating_point())
    assert not (output / "last").exists()  # no epoch finished: nothing to resume from but stopped/
