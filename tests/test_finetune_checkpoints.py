"""Checkpoints of a fine-tuning run: damaged or foreign ones refused, a crash during a save survived."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from noisy_meta.finetune import main
from noisy_meta.finetune.checkpoint import CheckpointError
from noisy_meta.finetune.models import create_model
from noisy_meta.finetune.settings import ModelSettings

from finetune_helpers import FAST, flat_tensors, metrics, run_example, without_timings

# ------------------------------------------------------------------------------- corrupted or foreign checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("finished") / "run"
    run_example("--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, "--epochs", "1")
    return output


def damaged_copy(finished_run: Path, tmp_path: Path, damage) -> Path:
    import shutil

    output = tmp_path / "damaged"
    shutil.copytree(finished_run, output)
    damage(output / "last")
    return output


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, flags, message",
    [
        (
            lambda d: truncate(d / "student.safetensors"),
            [],
            r"student.safetensors is not a readable safetensors file \(truncated",
        ),
        (lambda d: truncate(d / "model.safetensors"), [], r"model.safetensors is not a readable safetensors file"),
        (
            lambda d: (d / "mentor.safetensors").unlink(),
            [],
            r"lacks mentor.safetensors; it is not a complete checkpoint",
        ),
        (lambda d: None, ["--num-classes", "12"], r"holds other shapes than the model: .* another number of classes"),
        (lambda d: None, ["--model", "resnet10t"], r"was not saved from this architecture \(ResNet\)"),
    ],
    ids=["truncated-student", "truncated-accelerate-model", "missing-mentor", "other-classes", "other-architecture"],
)
def test_resume_refuses_a_damaged_or_foreign_checkpoint(
    tiny_mnist, finished_run, tmp_path, damage, flags, message, make_accelerator
):
    output = damaged_copy(finished_run, tmp_path, damage)
    before = {p.name: p.read_bytes() for p in (output / "last").iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=message) as error:
        main(["--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, "--epochs", "2", *flags, "--resume"])
    assert str(output / "last") in str(error.value)
    assert {p.name: p.read_bytes() for p in (output / "last").iterdir() if p.is_file()} == before  # nothing written
    assert len(metrics(output)) == 1  # the log is untouched


@pytest.mark.parametrize(
    "make_file, message",
    [
        (
            lambda run, path: path.write_bytes((run / "last" / "student.safetensors").read_bytes()[:1000]),
            "is not a readable safetensors file",
        ),
        (lambda run, path: path.write_bytes(b"not a checkpoint at all"), "is not a readable safetensors file"),
        (
            lambda run, path: save_file({"weight": torch.zeros(3)}, str(path)),
            r"does not fit --model test_resnet: \d+ of its \d+ tensors outside the classifier are missing",
        ),
    ],
    ids=["truncated", "garbage", "other-architecture"],
)
def test_checkpoint_flag_refuses_damaged_or_foreign_weights(finished_run, tmp_path, make_file, message):
    path = tmp_path / "weights.safetensors"
    make_file(finished_run, path)
    with pytest.raises(CheckpointError, match=message) as error:
        create_model(ModelSettings("test_resnet", checkpoint=str(path)), num_classes=10)
    assert str(path) in str(error.value)


def test_iteration_mentor_from_another_run_is_refused(finished_run, tmp_path):
    from noisy_meta.finetune.models import load_mentor

    with pytest.raises(CheckpointError, match="the previous iteration's best mentor: .* holds other shapes"):
        load_mentor(ModelSettings("test_resnet"), 12, finished_run / "best" / "mentor.safetensors")


# ------------------------------------------------------------------------------- a crash during a save


@pytest.mark.parametrize("crash_point", ["while writing", "between the renames", "disk full"])
def test_a_crash_during_a_save_leaves_a_checkpoint_that_resumes_exactly(
    tiny_mnist, tmp_path, monkeypatch, crash_point, make_accelerator
):
    from noisy_meta.finetune import checkpoint

    flags = ["--dataset", str(tiny_mnist), *FAST, "--epochs", "3", "--seed", "4"]
    reference = tmp_path / "reference"
    main([*flags, "--output-dir", str(reference)])

    saves = []
    real_save_weights, real_swap = checkpoint.save_weights, checkpoint._swap_in

    def crashing_save_weights(module, path, state=None):
        if len(saves) == 4 and crash_point == "disk full":
            real_save_weights(module, path, state)  # a partial copy, then the write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        if len(saves) == 4:  # epoch 2's first save (student and mentor of "best" and "last" in epoch 1)
            raise KeyboardInterrupt("simulated kill while writing")
        saves.append(path)
        real_save_weights(module, path, state)

    def crashing_swap(staging, directory, keep=1):
        saves.append(directory)
        if len(saves) == 4:  # a later epoch's swap: the old copy is set aside, then the process dies
            directory.rename(directory.with_name(directory.name + ".old"))
            raise KeyboardInterrupt("simulated kill between the renames")
        real_swap(staging, directory, keep)

    if crash_point == "between the renames":
        monkeypatch.setattr(checkpoint, "_swap_in", crashing_swap)
    else:
        monkeypatch.setattr(checkpoint, "save_weights", crashing_save_weights)
    interrupted = tmp_path / "interrupted"
    if crash_point == "disk full":  # a clear error; the partial copy removed, the previous checkpoint kept
        with pytest.raises(OSError, match=r"writing the checkpoint .* failed .*No space left.*previous checkpoint"):
            main([*flags, "--output-dir", str(interrupted)])
        assert not list(interrupted.glob("*.tmp")) and (interrupted / "last").is_dir()
    else:
        with pytest.raises(KeyboardInterrupt, match="simulated kill"):
            main([*flags, "--output-dir", str(interrupted)])
        leftover = "*.tmp" if crash_point == "while writing" else "*.old"  # of "best" or "last"
        assert list(interrupted.glob(leftover)), "the simulated kill hit no save"
    monkeypatch.undo()

    main([*flags, "--output-dir", str(interrupted), "--resume"])
    assert without_timings(metrics(interrupted)) == without_timings(metrics(reference))
    for name in ("student.safetensors", "mentor.safetensors", "model.safetensors"):
        resumed, uninterrupted = load_file(str(interrupted / "last" / name)), load_file(str(reference / "last" / name))
        assert resumed.keys() == uninterrupted.keys() and all(
            torch.equal(resumed[k], v) for k, v in uninterrupted.items()
        ), name
    optimizer = [torch.load(run / "last" / "optimizer.bin", weights_only=False) for run in (interrupted, reference)]
    assert all(torch.equal(a, b) for a, b in zip(flat_tensors(optimizer[0]), flat_tensors(optimizer[1]), strict=True))
    assert not (interrupted / "last.tmp").exists() and not (interrupted / "last.old").exists()
