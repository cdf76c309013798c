"""`examples/finetune.py` and `noisy_meta.finetune`: flags, data loading, runs, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets import Image, load_from_disk
from safetensors.torch import load_file, save_file
from test_distributed import launch

from noisy_meta import MetaNoiseConfig
from noisy_meta.finetune import build_parser, main, resolve_meta_config
from noisy_meta.finetune.checkpoint import CheckpointError
from noisy_meta.finetune.data import collate, embedded_mnist, load_image_dataset, prepare_splits
from noisy_meta.finetune.models import create_model
from noisy_meta.labels.cleaning import CleaningConfig, find_label_issues
from noisy_meta.labels.noise import OUTSIDE

from helpers import TinyMLP, make_wrapper

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "finetune.py"
FAST = [
    "--model",
    "test_resnet",
    "--img-size",
    "32",
    "--no-aug",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--first-order",
    "--num-synthetic",
    "2",
    "--num-neighbors",
    "4",
    "--val-fraction",
    "0.2",
]
TIMING_KEYS = ("seconds", "images_per_second")


def run_example(*flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *flags], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ------------------------------------------------------------------------------- flags


def test_every_config_field_has_a_flag_that_reaches_the_config():
    values = {
        "num_synthetic": ("3", 3),
        "perturb_ratio": ("0.25", 0.25),
        "num_neighbors": ("4", 4),
        "feature_source": ("student", "student"),
        "inner_step": ("relative", "relative"),
        "inner_lr": ("0.05", 0.05),
        "inner_radius": ("0.02", 0.02),
        "first_order": (None, True),
        "fast_params": ("layer4.*,fc.*", ("layer4.*", "fc.*")),
        "meta_every": ("2", 2),
        "compensate_meta_every": (None, True),
        "meta_batch_fraction": ("0.5", 0.5),
        "sets_per_pass": ("5", 5),
        "meta_weight": ("2.0", 2.0),
        "ramp_start": ("7", 7),
        "ramp_end": ("9", 9),
        "mentor_decay_ramp": ("0.5", 0.5),
        "mentor_decay": ("0.6", 0.6),
        "mentor_update": ("frozen", "frozen"),
        "update_rule": ("sequential", "sequential"),
        "clip_grad": ("1.5", 1.5),
        "dist_bn": ("broadcast", "broadcast"),
        "seed": ("11", 11),
    }
    from noisy_meta.losses import GeneralizedCrossEntropy

    flags_of_their_own = {"criterion": (["--loss", "gce", "--gce-q", "0.5"], GeneralizedCrossEntropy(0.5))}
    assert set(values) | set(flags_of_their_own) == {f.name for f in dataclasses.fields(MetaNoiseConfig)}, (
        "a new field needs a flag and this test"
    )
    argv = []
    for name, (text, _) in values.items():
        flag = "--meta-seed" if name == "seed" else "--" + name.replace("_", "-")
        argv += [flag] if text is None else [flag, text]
    for flags, _ in flags_of_their_own.values():
        argv += flags
    values.update({name: (None, expected) for name, (_, expected) in flags_of_their_own.items()})
    config, automatic = resolve_meta_config(build_parser().parse_args(argv), total_updates=1000)
    assert automatic == {}
    for name, (_, expected) in values.items():
        assert getattr(config, name) == expected, name


@pytest.mark.parametrize("name", ["all", "last_stage", "head"])
def test_named_fast_params_modes_are_not_taken_for_patterns(name):
    config, _ = resolve_meta_config(build_parser().parse_args(["--fast-params", name]), total_updates=100)
    assert config.fast_params == name


def test_run_length_defaults_and_no_meta():
    args = build_parser().parse_args(["--no-meta", "--seed", "5"])
    config, automatic = resolve_meta_config(args, total_updates=1000)
    assert (config.ramp_start, config.ramp_end) == (100, 400)
    assert config.mentor_decay == pytest.approx(0.98) and config.mentor_decay_ramp == pytest.approx(0.95)
    assert set(automatic) == {"ramp_start", "ramp_end", "mentor_decay", "mentor_decay_ramp"}
    assert config.meta_weight == 0.0 and config.seed == 5
    long_run, _ = resolve_meta_config(args, total_updates=10**6)
    assert (long_run.mentor_decay, long_run.mentor_decay_ramp) == (0.999, 0.99)  # the reference's


def test_bad_flag_values_are_refused():
    with pytest.raises(ValueError, match="num_synthetic"):
        resolve_meta_config(build_parser().parse_args(["--num-synthetic", "-1"]), total_updates=100)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--update-rule", "both"])


# ------------------------------------------------------------------------------- data


def test_embedded_mnist_is_balanced_and_fixed():
    data = embedded_mnist()
    assert (len(data["train"]), len(data["test"])) == (4000, 1000)
    assert np.bincount(data["test"]["label"]).tolist() == [100] * 10
    assert data["train"][0]["image"].size == (28, 28)
    assert embedded_mnist()["train"]["label"][:50] == data["train"]["label"][:50]


def test_loads_save_to_disk_imagefolder_and_parquet(tiny_mnist, tmp_path):
    saved = load_image_dataset(str(tiny_mnist))
    assert set(saved) == {"train", "test"} and len(saved["train"]) == 320

    folder = tmp_path / "folder"
    for split in ("train", "test"):
        for i, row in enumerate(saved[split].select(range(20))):
            target = folder / split / str(row["label"])
            target.mkdir(parents=True, exist_ok=True)
            row["image"].save(target / f"{i}.png")
    from_folder = load_image_dataset(str(folder))
    assert len(from_folder["train"]) == 20 and set(from_folder["test"].column_names) == {"image", "label"}

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for split in ("train", "test"):
        saved[split].to_parquet(str(parquet / f"{split}.parquet"))
    from_parquet = load_image_dataset(str(parquet / "*.parquet"))
    assert len(from_parquet["train"]) == 320 and len(from_parquet["test"]) == 100


def split_args(**overrides):
    values = dict(
        train_split="train",
        val_split=None,
        test_split="test",
        image_column="image",
        label_column="label",
        clean_label_column=None,
        num_classes=None,
        noise="symmetric",
        noise_rate=0.5,
        val_fraction=0.25,
        seed=0,
    )
    values.update(overrides)
    return values


def test_noise_keeps_the_clean_label_and_validation_is_carved_from_train(tiny_mnist):
    data = load_from_disk(str(tiny_mnist))
    splits = prepare_splits(data, **split_args())
    assert splits.num_classes == 10 and splits.validation_is_clean
    assert len(splits.train) + len(splits.validation) == 320
    train = splits.train
    noisy = np.asarray(train["label"]) != np.asarray(train["clean_label"])
    assert 0.4 < noisy.mean() < 0.6 and splits.noise.realised_rate == pytest.approx(np.mean(splits.noise.is_noisy))
    originals = np.asarray(data["train"]["label"])[np.asarray(train["index"])]
    assert np.array_equal(originals, np.asarray(train["clean_label"]))
    test = splits.test
    assert test["label"] == test["clean_label"] or test["clean_label"] == [-1] * len(test)


def test_a_clean_label_column_is_kept_beside_the_noisy_one(tiny_mnist):
    data = load_from_disk(str(tiny_mnist))
    data = data.map(lambda row: {"worse_label": (row["label"] + row["label"] % 2) % 10})  # CIFAR-10N style
    splits = prepare_splits(data, **split_args(label_column="worse_label", clean_label_column="label", noise="none"))
    assert splits.noise is None and splits.validation_is_clean
    for split in (splits.train, splits.validation, splits.test):
        clean = np.asarray(split["clean_label"])
        assert np.array_equal(np.asarray(split["label"]), (clean + clean % 2) % 10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(test_split="holdout"), "--test-split 'holdout' not in the data set"),
        (dict(label_column="target"), "column 'target' not in the training split"),
        (dict(num_classes=5), "outside \\[0, 5\\)"),
        (dict(val_fraction=1.0), "--val-fraction must be in"),
    ],
)
def test_data_errors_name_the_problem(tiny_mnist, overrides, message):
    with pytest.raises(ValueError, match=message):
        prepare_splits(load_from_disk(str(tiny_mnist)), **split_args(**overrides))


def test_checkpoint_flag_loads_local_weights_and_replaces_a_different_classifier(tmp_path):
    from noisy_meta.finetune.checkpoint import save_weights
    from noisy_meta.finetune.models import create_model

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "weights.safetensors"
    save_weights(source, path)
    args = build_parser().parse_args(["--model", "test_resnet", "--checkpoint", str(path)])
    model = create_model(args, num_classes=3)
    assert model.num_classes == 3
    loaded, saved = model.state_dict(), source.state_dict()
    head = {name for name, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    for name in saved:
        if name not in head:
            assert torch.equal(loaded[name], saved[name]), name
    with pytest.raises(FileNotFoundError, match="--checkpoint: no file"):
        create_model(build_parser().parse_args(["--checkpoint", str(tmp_path / "missing.pt")]), num_classes=3)


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
    from noisy_meta.finetune import train_loop, trainer

    train_batches = []

    def poisoned(samples):
        batch = collate(samples)
        if len(samples) == 32:  # training batches (evaluation uses 64)
            train_batches.append(1)
            if len(train_batches) > 2:
                batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    monkeypatch.setattr(trainer, "collate", poisoned)
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
        train_loop.NonFiniteTrainingError,
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
        create_model(build_parser().parse_args(["--model", "test_resnet", "--checkpoint", str(path)]), num_classes=10)
    assert str(path) in str(error.value)


def test_iteration_mentor_from_another_run_is_refused(finished_run, tmp_path):
    from noisy_meta.finetune.models import load_mentor

    with pytest.raises(CheckpointError, match="the previous iteration's best mentor: .* holds other shapes"):
        load_mentor(
            build_parser().parse_args(["--model", "test_resnet"]), 12, finished_run / "best" / "mentor.safetensors"
        )


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

    def crashing_save_weights(module, path):
        if len(saves) == 4 and crash_point == "disk full":
            real_save_weights(module, path)  # a partial copy, then the write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        if len(saves) == 4:  # epoch 2's first save (student and mentor of "best" and "last" in epoch 1)
            raise KeyboardInterrupt("simulated kill while writing")
        saves.append(path)
        real_save_weights(module, path)

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


def flat_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in flat_tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in flat_tensors(item)]
    return []


# ------------------------------------------------------------------------------- bad data


def test_grey_rgba_and_rgb_images_are_all_fed_as_rgb():
    from datasets import Dataset, Image
    from PIL import Image as PILImage

    from noisy_meta.finetune.data import attach_transform

    images = [
        PILImage.new(mode, (20, 12), color)
        for mode, color in (("L", 128), ("RGBA", (1, 2, 3, 4)), ("RGB", (9, 9, 9)), ("P", 3))
    ]
    data = Dataset.from_dict({"image": images, "label": [0, 1, 2, 3], "clean_label": [-1] * 4, "index": list(range(4))})
    data = data.cast_column("image", Image())
    model = timm.create_model("test_resnet", num_classes=4)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 16, 16)}, model=model))
    batch = collate([attach_transform(data, transform)[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and torch.isfinite(batch["pixel_values"]).all()


def test_a_data_set_smaller_than_one_batch_is_refused_before_training(tiny_mnist, tmp_path, make_accelerator):
    with pytest.raises(ValueError, match=r"the training split \(256 samples\) is smaller than one batch \(300\)"):
        main(["--dataset", str(tiny_mnist), "--output-dir", str(tmp_path / "small"), *FAST, "--batch-size", "300"])
    assert not (tmp_path / "small" / "last").exists()


@pytest.fixture
def folder_with_bad_images(tiny_mnist, tmp_path) -> Path:
    """An imagefolder of 80 training digits, one truncated PNG and one text file named .png."""
    saved = load_image_dataset(str(tiny_mnist))
    folder = tmp_path / "folder"
    for split, count in (("train", 80), ("test", 20)):
        for i, row in enumerate(saved[split].select(range(count))):
            target = folder / split / str(row["label"])
            target.mkdir(parents=True, exist_ok=True)
            row["image"].save(target / f"{i}.png")
    good = folder / "train" / "3"
    data = next(good.glob("*.png")).read_bytes()
    (good / "truncated.png").write_bytes(data[: len(data) // 3])
    (good / "garbage.png").write_bytes(b"this is not an image")
    return folder


def test_undecodable_images_are_refused_before_training_by_default(folder_with_bad_images, tmp_path, make_accelerator):
    with pytest.raises(
        ValueError,
        match=r"2 image\(s\) do not decode: train sample \d+ \(.*(truncated|garbage)\.png\).*--bad-images skip",
    ):
        main(
            [
                "--dataset",
                str(folder_with_bad_images),
                "--output-dir",
                str(tmp_path / "refused"),
                *FAST,
                "--epochs",
                "1",
            ]
        )
    assert not (tmp_path / "refused" / "last").exists()


def test_undecodable_images_can_be_skipped_counted_and_listed(folder_with_bad_images, tmp_path, make_accelerator):
    output = tmp_path / "skipping"
    main(
        [
            "--dataset",
            str(folder_with_bad_images),
            "--output-dir",
            str(output),
            *FAST,
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--bad-images",
            "skip",
        ]
    )
    listed = json.loads((output / "bad_images.json").read_text())
    assert sorted(Path(b["path"]).name for b in listed) == ["garbage.png", "truncated.png"]
    assert all(b["split"] == "train" and b["error"] for b in listed)
    loaded = load_image_dataset(str(folder_with_bad_images))
    assert sorted(
        Path(loaded["train"].cast_column("image", Image(decode=False))[b["index"]]["image"]["path"]).name
        for b in listed
    ) == ["garbage.png", "truncated.png"]
    # 80 decodable training images, of which --val-fraction 0.2 (16) become the validation split
    assert metrics(output)[-1]["train_samples"] == 64  # counted, nothing else lost


def test_undecodable_images_are_found_before_instance_noise_decodes_them(
    folder_with_bad_images, tmp_path, make_accelerator
):
    with pytest.raises(ValueError, match=r"2 image\(s\) do not decode"):
        main(
            [
                "--dataset",
                str(folder_with_bad_images),
                "--output-dir",
                str(tmp_path / "instance"),
                *FAST,
                "--noise",
                "instance",
                "--noise-rate",
                "0.4",
            ]
        )


def test_an_empty_class_is_reported_before_training(tiny_mnist, tmp_path):
    result = run_example(
        "--dataset",
        str(tiny_mnist),
        "--output-dir",
        str(tmp_path / "empty"),
        *FAST,
        "--epochs",
        "1",
        "--num-classes",
        "12",
    )
    assert "2 of 12 classes have no training sample (classes [10, 11])" in " ".join(result.stdout.split())


# ------------------------------------------------------------------------------- open-set noise


def test_open_set_noise_shrinks_the_label_space_of_every_split(tiny_mnist):
    data = load_from_disk(str(tiny_mnist))
    splits = prepare_splits(data, **split_args(noise="open_set", noise_rate=0.25, open_set_classes=(7, 8, 9)))
    assert splits.num_classes == 7 and splits.class_names == [str(d) for d in range(7)]
    in_space = sum(1 for label in data["train"]["label"] if label < 7)
    assert len(splits.train) + len(splits.validation) == in_space  # outside images replace, not add
    clean = np.concatenate([splits.train["clean_label"], splits.validation["clean_label"]])
    assert np.sum(clean == OUTSIDE) == round(0.25 * in_space)
    assert splits.noise.realised_rate == pytest.approx(0.25, abs=0.01)
    for split in (splits.train, splits.validation):
        assert max(split["label"]) < 7
    test_originals = [label for label in data["test"]["label"] if label < 7]
    assert splits.test["label"] == test_originals and len(splits.test) < len(data["test"])
    with pytest.raises(ValueError, match="for --noise open_set only"):
        prepare_splits(data, **split_args(open_set_classes=(9,)))


def test_validation_does_not_score_images_from_outside_the_label_space(make_accelerator):
    from noisy_meta.finetune.train_loop import validate

    torch.manual_seed(0)
    wrapper = make_wrapper(TinyMLP())
    x = torch.randn(12, 6)
    predicted = wrapper.module(x).argmax(1)
    clean = predicted.clone()
    clean[:4] = (predicted[:4] + 1) % 3  # 4 wrong among the scored
    clean[8:] = OUTSIDE  # 4 outside images, whatever is predicted
    label = torch.zeros(12, dtype=torch.long)
    batch = {"pixel_values": x, "label": label, "clean_label": clean, "index": torch.arange(12)}
    accuracy = validate(make_accelerator(), wrapper, [batch])
    assert accuracy["student"] == pytest.approx(4 / 8)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--noise", "open_set"], "needs --open-set-classes"),
        (["--noise", "symmetric", "--open-set-classes", "9"], "--open-set-classes is for --noise open_set only"),
        (["--noise", "open_set", "--open-set-classes", "9", "--noise-rate", "1"], "needs --noise-rate below 1"),
    ],
)
def test_noise_flag_errors_come_before_any_data_is_loaded(flags, message):
    with pytest.raises(ValueError, match=message):
        main([*FAST, *flags, "--dataset", "/nonexistent/data", "--output-dir", "/nonexistent/never-written"])


def test_an_open_set_run_trains_and_scores_only_in_space_images(tiny_mnist, tmp_path):
    output = tmp_path / "open"
    result = run_example(
        *FAST, "--epochs", "1", "--dataset", str(tiny_mnist), "--noise", "open_set", "--open-set-classes", "8", "9",
        "--noise-rate", "0.2", "--output-dir", str(output),
    )  # fmt: skip
    assert "classes [8, 9] left the label space" in result.stdout and "8 classes" in result.stdout
    (record,) = metrics(output)
    assert 0.0 <= record["val_student"] <= 1.0


# ------------------------------------------------------------------------------- fine-tuning defaults


def test_runs_from_pretrained_weights_get_the_fine_tuning_recipe():
    from noisy_meta.config import FINETUNE_PRESET

    parse = build_parser().parse_args
    config, chosen = resolve_meta_config(parse(["--checkpoint", "w.safetensors", "--lr", "0.01"]), 1000)
    for name, value in FINETUNE_PRESET.items():
        assert getattr(config, name) == value and chosen[name] == value
    config, _ = resolve_meta_config(parse(["--pretrained", "--inner-radius", "0.2", "--meta-every", "2"]), 1000)
    assert (config.inner_radius, config.meta_every, config.inner_step) == (0.2, 2, "relative")  # flags win
    config, _ = resolve_meta_config(parse([]), 1000)  # from scratch: the library's
    assert config.inner_step == MetaNoiseConfig().inner_step and config.meta_every == 1


def test_preset_full_from_pretrained_weights_keeps_the_earlier_fine_tuning_defaults():
    parse = build_parser().parse_args
    config, chosen = resolve_meta_config(
        parse(["--checkpoint", "w.safetensors", "--lr", "0.01", "--preset", "full"]), 1000
    )
    assert config.inner_lr == pytest.approx(0.01) and config.num_synthetic == 3 and config.inner_step == "sgd"
    assert chosen["inner_lr"] == pytest.approx(0.01) and chosen["num_synthetic"] == 3
    config, chosen = resolve_meta_config(
        parse(["--pretrained", "--preset", "full", "--inner-lr", "0.5", "--num-synthetic", "7"]), 1000
    )
    assert (config.inner_lr, config.num_synthetic) == (0.5, 7) and "inner_lr" not in chosen  # flags win


def test_the_loss_flags_choose_the_criterion():
    from noisy_meta.losses import CrossEntropy, GeneralizedCrossEntropy, SymmetricCrossEntropy

    parse = build_parser().parse_args
    assert resolve_meta_config(parse([]), 100)[0].criterion == "cross_entropy"
    assert resolve_meta_config(parse(["--smoothing", "0.1"]), 100)[0].criterion == CrossEntropy(0.1)
    assert resolve_meta_config(parse(["--loss", "gce", "--gce-q", "0.5"]), 100)[0].criterion == GeneralizedCrossEntropy(
        0.5
    )
    assert resolve_meta_config(parse(["--loss", "sce"]), 100)[0].criterion == SymmetricCrossEntropy()


def test_clean_before_defaults_follow_the_preset(monkeypatch):
    from noisy_meta.finetune import cli

    parse = build_parser().parse_args
    assert cli.clean_before_action(parse([])) == "off"
    assert cli.clean_before_action(parse(["--pretrained"])) == cli.FINETUNE_CLEANING
    assert cli.clean_before_action(parse(["--pretrained", "--clean-before", "relabel"])) == "relabel"
    monkeypatch.setattr(cli, "FINETUNE_CLEANING", "remove")  # a recipe that detects before training
    assert cli.clean_before_action(parse(["--pretrained"])) == "remove"
    assert cli.clean_before_action(parse(["--pretrained", "--preset", "fast"])) == "off"
    assert cli.clean_before_action(parse(["--pretrained", "--streaming"])) == "off"


@pytest.mark.parametrize("action", ["remove", "relabel"])
def test_clean_before_flags_the_training_split_with_the_starting_weights(tiny_mnist, tmp_path, action):
    """A run from --checkpoint: the vote over the starting model's features flags images, the run
    trains on what is left (or relabelled), and clean_before.json lists what was flagged."""
    from noisy_meta.finetune.checkpoint import save_weights

    torch.manual_seed(0)
    weights = tmp_path / "start.safetensors"
    save_weights(timm.create_model("test_resnet", num_classes=10), weights)
    output = tmp_path / action
    result = run_example(
        "--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, "--epochs", "1",
        "--checkpoint", str(weights), "--clean-before", action, "--clean-before-k", "5",
        "--noise", "symmetric", "--noise-rate", "0.4",
    )  # fmt: skip
    record = json.loads((output / "clean_before.json").read_text())
    flagged = len(record["flagged_index"])
    assert record["action"] == action and record["k"] == 5 and flagged == record["detection"]["num_flagged"] > 0
    assert record["detection"]["num_noisy"] > 0 and record["detection"]["precision"] is not None
    assert f"--clean-before {action}: {flagged} of 256 samples flagged" in " ".join(result.stdout.split())
    (epoch,) = metrics(output)
    assert epoch["train_samples"] == (256 - flagged if action == "remove" else 256)
    probs = np.load(output / "clean_before_pred_probs.npz")
    assert probs["pred_probs"].shape == (256, 10)
    np.testing.assert_allclose(probs["pred_probs"].sum(axis=1), 1.0)
