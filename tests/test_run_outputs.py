"""What a fine-tuning run leaves its user: tracker logs, args.yaml / --config, report.png, an exported model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from noisy_meta.finetune import main
from noisy_meta.finetune.checkpoint import CheckpointError
from noisy_meta.finetune.cli import build_parser, parse_settings, run_command
from noisy_meta.finetune.export import best_record
from noisy_meta.finetune.flags import INVOCATION_FLAGS, recorded_flags, write_args_file
from noisy_meta.finetune.report import report_data, write_report
from noisy_meta.finetune.tracking import check_trackers

from finetune_helpers import FAST, metrics, run_example

pytest.importorskip("tensorboard")

NOISE = ["--noise", "symmetric", "--noise-rate", "0.4"]


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard holds under ``directory``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


@pytest.fixture(scope="module")
def tracked_run(tiny_mnist, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("outputs")
    output, export = root / "run", root / "export"
    flags = ["--log-with", "tensorboard", "--experiment", "trial", "--export-dir", str(export)]
    flags += NOISE
    run_example("--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, *flags)
    return output, export


# ------------------------------------------------------------------------------------------------ trackers


def test_tensorboard_holds_every_update_and_every_epoch(tracked_run):
    output, _ = tracked_run
    records = metrics(output)
    logged = scalars(output / "tracking" / "trial")
    updates = records[-1]["updates"]
    assert [step for step, _ in logged["train/loss"]] == list(range(1, updates + 1))
    for key in ("train/ce_loss", "train/meta_loss", "train/meta_weight", "train/lr"):
        assert len(logged[key]) == updates, key
    for split in ("val", "test"):
        for who in ("student", "mentor"):
            expected = [(r["updates"], r[f"{split}_{who}"]) for r in records]
            got = logged[f"{split}/{who}"]
            assert [s for s, _ in got] == [s for s, _ in expected]
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-6)
    rates = [value for _, value in logged["train/lr"]]  # the rate each update stepped with: cosine from --lr
    assert rates[0] == pytest.approx(0.05) and all(a >= b for a, b in zip(rates, rates[1:])) and rates[-1] > 0


def test_a_tracker_that_is_not_installed_is_refused_by_name():
    from accelerate.tracking import get_available_trackers

    if "aim" in {str(t) for t in get_available_trackers()}:
        pytest.skip("aim is installed here")
    with pytest.raises(ValueError, match=r"--log-with aim: not installed \(pip install aim\)"):
        check_trackers(("tensorboard", "aim"))
    check_trackers(("tensorboard",))
    check_trackers(())


def test_iterations_log_to_one_tracker_run_and_one_report(tiny_mnist, tmp_path):
    output = tmp_path / "iterations"
    flags = ["--iterations", "2", "--epochs", "1", "--log-with", "tensorboard", "--experiment", "both"]
    flags += ["--clean-criterion", "given_label_prob", "--clean-threshold", "0.02"]  # a model of one epoch: flag few
    run_example("--dataset", str(tiny_mnist), "--output-dir", str(output), *FAST, *flags)
    logged = scalars(output / "tracking" / "both")
    first, second = metrics(output / "iteration_1")[-1], metrics(output / "iteration_2")[-1]
    assert [step for step, _ in logged["val/mentor"]] == [first["updates"], first["updates"] + second["updates"]]
    assert [step for step, _ in logged["train/loss"]] == list(range(1, first["updates"] + second["updates"] + 1))
    records, starts, steps = report_data(output)
    assert len(records) == 2 and starts == [1]
    assert [name for name, _ in steps] == ["before iteration 2"]
    assert steps[0][1] == json.loads((output / "iteration_2" / "cleaning.json").read_text())["detection"]
    for directory in (output, output / "iteration_1", output / "iteration_2"):
        assert (directory / "report.png").exists(), directory
    assert "flags" in yaml.safe_load((output / "args.yaml").read_text())
    assert "meta_config" in yaml.safe_load((output / "iteration_2" / "args.yaml").read_text())


# ------------------------------------------------------------------------------------------ args.yaml, --config


def test_args_yaml_records_the_resolved_flags_the_meta_config_and_versions(tracked_run, tiny_mnist):
    output, export = tracked_run
    recorded = yaml.safe_load((output / "args.yaml").read_text())
    flags = recorded["flags"]
    assert flags["dataset"] == str(tiny_mnist) and flags["epochs"] == 2 and flags["batch_size"] == 32
    assert flags["noise"] == "symmetric" and flags["noise_rate"] == 0.4
    assert flags["warmup_epochs"] == 0 and flags["opt"] == "sgd"  # defaults, resolved
    assert flags["log_with"] == ["tensorboard"] and flags["export_dir"] == str(export)
    assert "resume" not in flags and "config" not in flags  # how it was invoked, not what it is
    meta = recorded["meta_config"]
    assert meta["num_synthetic"] == 2 and meta["num_neighbors"] == 4 and meta["first_order"] is True
    assert recorded["versions"]["torch"] == metadata.version("torch")
    assert recorded["versions"]["noisy-meta"] == metadata.version("noisy-meta")
    position = json.loads((output / "last" / "position.json").read_text())
    assert position["flags"] == flags  # each checkpoint knows the run that wrote it


def test_config_starts_the_same_run_and_the_command_line_wins(tracked_run, tmp_path):
    output, _ = tracked_run
    args_file = output / "args.yaml"
    recorded = yaml.safe_load(args_file.read_text())["flags"]
    new = ["--output-dir", str(tmp_path / "again"), "--export-dir", str(tmp_path / "again-export")]
    again = parse_settings(["--config", str(args_file), *new, "--lr", "0.01"])
    assert again.flags["lr"] == 0.01 and again.flags["output_dir"] == str(tmp_path / "again")
    changed = ("lr", "output_dir", "export_dir")
    assert {name: value for name, value in recorded_flags(again.flags).items() if name not in changed} == {
        name: value for name, value in recorded.items() if name not in changed
    }
    # a plain mapping of flag names works too, '-' or '_'
    plain = tmp_path / "plain.yaml"
    plain.write_text("epochs: 3\nbatch-size: 16\nno_meta: true\nscale: [0.5, 1.0]\n")
    settings = parse_settings(["--config", str(plain), "--output-dir", str(tmp_path / "plain")])
    assert (settings.optim.epochs, settings.optim.batch_size, settings.meta.no_meta) == (3, 16, True)
    assert settings.data.scale == (0.5, 1.0)
    # flag names whose destination differs (MetaNoiseConfig fields) and the names args.yaml records
    plain.write_text("num-synthetic: 3\nmeta_num_neighbors: 4\nmentor_warmup: false\n")
    flags = parse_settings(["--config", str(plain)]).flags
    assert (flags["meta_num_synthetic"], flags["meta_num_neighbors"], flags["meta_mentor_warmup"]) == (3, 4, False)
    # a flag that is a switch and also takes a value: YAML's booleans and its value
    for text, expected in (("true", True), ("false", False), ("sqrt", "sqrt")):
        plain.write_text(f"compensate_meta_every: {text}\n")
        assert parse_settings(["--config", str(plain)]).flags["meta_compensate_meta_every"] == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 0.1\n", r"'learning_rate' is not a flag"),
        ("noise: gaussian\n", r"'noise' is 'gaussian', not one of"),
        ("epochs: -2\n", r"'epochs'"),
        ("no_meta: maybe\n", r"'no_meta' takes true or false"),
        ("compensate_meta_every: half\n", r"'compensate_meta_every': takes sqrt"),
        ("no_mentor_warmup: true\n", r"'no_mentor_warmup': write 'mentor_warmup: false'"),
        ("[1, 2]\n", r"expected a mapping of flag names"),
        ("epochs: [\n", r"not valid YAML"),
    ],
    ids=["unknown", "choice", "type", "bool", "bool-or-sqrt", "negated-switch", "not-a-mapping", "bad-yaml"],
)
def test_a_bad_config_file_is_refused_in_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        run_command(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(config) in error
    assert re.search(message, error), error
    with pytest.raises(ValueError, match="no such file"):
        parse_settings(["--config", str(tmp_path / "missing.yaml")])


def test_every_flag_round_trips_through_args_yaml(tmp_path):
    """Whatever the command line resolves, args.yaml gives back (every dest, including list-valued flags)."""

    argv = ["--output-dir", str(tmp_path / "a"), "--scale", "0.3", "0.9", "--noise", "open_set", "--noise-rate", "0.2"]
    argv += ["--open-set-classes", "8", "9", "--log-with", "tensorboard", "--fast-params", "head", "--meta-seed", "3"]
    settings = parse_settings(argv)
    write_args_file(tmp_path / "args.yaml", settings.flags)
    back = parse_settings(["--config", str(tmp_path / "args.yaml")])
    dests = {a.dest for a in build_parser()._actions} - {"help", *INVOCATION_FLAGS}
    assert set(recorded_flags(back.flags)) == dests
    assert recorded_flags(back.flags) == recorded_flags(settings.flags)
    assert back.noise.open_set_classes == (8, 9) and back.data.scale == (0.3, 0.9)
    assert back.output.log_with == ("tensorboard",) and back.meta.fields["fast_params"] == "head"


def test_resume_refuses_a_setting_its_state_depends_on(tracked_run, tmp_path, tiny_mnist, make_accelerator):
    output, _ = tracked_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    before = (copy / "metrics.jsonl").read_text()
    flags = ["--dataset", str(tiny_mnist), "--output-dir", str(copy), *FAST, *NOISE]
    with pytest.raises(CheckpointError, match=r"batch_size: 32 -> 16; seed: 0 -> 1\).*--config"):
        main([*flags, "--batch-size", "16", "--seed", "1", "--resume"])
    assert (copy / "metrics.jsonl").read_text() == before


def test_resume_says_which_settings_changed(tracked_run, tmp_path, tiny_mnist, make_accelerator, capsys):
    output, _ = tracked_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    flags = [
        "--dataset",
        str(tiny_mnist),
        "--output-dir",
        str(copy),
        *FAST,
        *NOISE,
        "--export-dir",
        str(tmp_path / "e"),
    ]
    main([*flags, "--epochs", "3", "--lr", "0.02", "--resume"])
    text = " ".join(capsys.readouterr().out.split())  # as one line, whatever the console's width
    assert "resuming with settings changed from the checkpoint's run: epochs: 2 -> 3" in text
    assert "lr: 0.05 -> 0.02" in text
    assert len(metrics(copy)) == 3


# ------------------------------------------------------------------------------------------------ report.png


def test_report_png_is_drawn_readable(tracked_run):
    output, _ = tracked_run
    with Image.open(output / "report.png") as image:
        width, height = image.size
        assert image.format == "PNG"
    assert width >= 1200 and height >= 350  # three panels at 100 dpi, each 5 inches wide


def test_report_shows_cleaning_when_there_was_some(tmp_path):
    records = [
        {"epoch": e, "val_student": 0.5, "val_mentor": 0.6, "train_loss": 1.0, "meta_weight": 1.0, "lr": 0.1}
        for e in (1, 2)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    detection = {"num_samples": 100, "num_flagged": 30, "num_noisy": 40, "precision": 0.9, "recall": 0.675}
    (tmp_path / "clean_before.json").write_text(json.dumps({"detection": detection}))
    _, starts, steps = report_data(tmp_path)
    assert starts == [] and steps == [("before training", detection)]
    path = write_report(tmp_path, "with cleaning")
    with Image.open(path) as image:
        assert image.size[0] >= 1600  # the fourth panel, the flagged counts
    assert write_report(tmp_path / "nothing-here") is None


# ------------------------------------------------------------------------------------------ label_issues.csv


def test_label_issues_rank_every_training_image_and_find_the_injected_noise(tracked_run):
    """40% symmetric noise: every training image ranked by its mean margin, flagged below 0, the mislabelled ones
    lower on average (16 updates of a tiny run: the ranking's quality is benchmarks/label_issues.py's); the
    picture is readable."""
    import csv

    output, _ = tracked_run
    with open(output / "label_issues.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    columns = "rank,index,given_label,given_name,suggested_label,suggested_name,aum,times_seen,flagged,clean_label"
    assert list(rows[0]) == columns.split(",")
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len({r["index"] for r in rows}) == len(rows) == metrics(output)[-1]["train_samples"]
    scores = [float(r["aum"]) for r in rows]
    assert scores == sorted(scores)
    assert all(r["flagged"] == str(int(float(r["aum"]) < 0)) for r in rows)
    assert all(int(r["times_seen"]) == 2 for r in rows)  # two epochs, each image once per epoch
    wrong = [float(r["aum"]) for r in rows if r["given_label"] != r["clean_label"]]
    right = [float(r["aum"]) for r in rows if r["given_label"] == r["clean_label"]]
    assert sum(wrong) / len(wrong) < sum(right) / len(right)
    with Image.open(output / "label_issues.png") as image:
        assert image.format == "PNG" and image.size[0] >= 1200  # six thumbnails a row at 100 dpi


def test_a_second_run_trains_without_the_flagged_images_and_refuses_a_foreign_table(tracked_run, tiny_mnist, tmp_path):
    """--label-issues: train, inspect, fix, retrain. The flagged rows go (a row a person set to 0 stays); a table
    from another training split is refused before training, naming its line."""
    import csv

    output, _ = tracked_run
    with open(output / "label_issues.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    edited = tmp_path / "edited.csv"

    def write_table() -> None:  # the table as a person saves it after editing
        with open(edited, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    rows[0]["flagged"] = "0"  # a person looked and kept it
    write_table()
    removed = sum(r["flagged"] == "1" for r in rows)
    again = tmp_path / "again"
    result = run_example(
        "--dataset", str(tiny_mnist), "--output-dir", str(again), *FAST, *NOISE, "--label-issues", str(edited)
    )
    assert f"--label-issues remove: {removed} flagged" in result.stdout
    assert metrics(again)[-1]["train_samples"] == len(rows) - removed

    rows[1]["given_label"] = str((int(rows[1]["given_label"]) + 1) % 10)  # not what that image is labelled here
    write_table()
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "noisy_meta.finetune",
            "--dataset",
            str(tiny_mnist),
            "--output-dir",
            str(tmp_path / "no"),
            *FAST,
            *NOISE,
            "--label-issues",
            str(edited),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        refused.returncode != 0 and "line 3: image" in refused.stderr and "same data, noise and seed" in refused.stderr
    )


def test_label_issues_table_by_hand(tmp_path):
    """Ranks, the flag, suggested names and CSV quoting, from margins written out."""
    import csv

    import datasets
    from datasets import Dataset

    from noisy_meta import AreaUnderMargin
    from noisy_meta.finetune.report import write_label_issues

    aum = AreaUnderMargin(5)  # indices 0..4; the split holds 1, 3 and 4 (0 and 2 were removed before training)
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.5]])
    aum.update(torch.tensor([1, 3, 4]), logits, torch.tensor([0, 0, 1]))  # margins 2, -3, -0.5
    images = [Image.new("L", (8, 8), color) for color in (0, 128, 255)]
    train = Dataset.from_dict({"image": images, "label": [0, 0, 1], "clean_label": [0, 1, 0], "index": [1, 3, 4]})
    issues = write_label_issues(tmp_path, aum, train, ["cat, black", "dog"])
    with open(tmp_path / "label_issues.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["index"], r["aum"], r["flagged"]) for r in rows] == [
        ("3", "-3", "1"),
        ("4", "-0.5", "1"),
        ("1", "2", "0"),
    ]
    assert (rows[0]["given_name"], rows[0]["suggested_name"]) == ("cat, black", "dog")
    assert "path" not in rows[0]  # images held as bytes: no files to name
    assert (issues.num_samples, issues.num_flagged, issues.precision, issues.recall) == (3, 2, 1.0, 1.0)
    assert "2 of 3 training labels look wrong" in issues.line()

    files = []  # an imagefolder's images are files: the table names each one
    for position, image in enumerate(images):
        files.append(str(tmp_path / f"image_{position}.png"))
        image.save(files[-1])
    from_files = train.remove_columns("image").add_column("image", files).cast_column("image", datasets.Image())
    write_label_issues(tmp_path, aum, from_files.select_columns(train.column_names), ["cat, black", "dog"])
    with open(tmp_path / "label_issues.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["index"], r["path"]) for r in rows] == [("3", files[1]), ("4", files[2]), ("1", files[0])]


# ---------------------------------------------------------------------------------------------- --export-dir


def test_export_loads_back_with_timm_offline_as_the_kept_model(tracked_run):
    import timm

    output, export = tracked_run
    best, kept = best_record(metrics(output))
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    saved = load_file(str(output / "best" / f"{kept}.safetensors"))
    state = model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[name], saved[name]) for name in saved)
    assert model.pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm")
    assert f"The {kept} of epoch {best['epoch']} of 2" in card
    assert f"{100 * best[f'val_{kept}']:.2f}%" in card and "symmetric, rate 0.4" in card
    assert "num_synthetic: 2" in card and "10 classes" in card


def test_export_flags_are_checked_before_the_run(tmp_path):
    with pytest.raises(ValueError, match="--push-to-hub uploads the --export-dir"):
        parse_settings(["--output-dir", str(tmp_path / "a"), "--push-to-hub", "me/model"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--export-dir .* is not empty"):
        parse_settings(["--output-dir", str(tmp_path / "b"), "--export-dir", str(full)])


def test_a_failed_upload_leaves_the_export_and_says_so(tiny_mnist, tmp_path, monkeypatch, make_accelerator):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, exist_ok: calls.append(repo) or repo)

    def refuse(**kwargs):
        calls.append(sorted(path.name for path in Path(kwargs["folder_path"]).iterdir()))
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "upload_folder", refuse)
    export = tmp_path / "export"
    flags = ["--dataset", str(tiny_mnist), "--output-dir", str(tmp_path / "run"), *FAST, "--epochs", "1"]
    with pytest.raises(OSError, match=r"--push-to-hub me/model: the upload failed \(no network\); the export is in"):
        main([*flags, "--export-dir", str(export), "--push-to-hub", "me/model"])
    assert calls == ["me/model", ["README.md", "config.json", "model.safetensors"]]


# -------------------------------------------------------------------------------------------- entry points


def test_the_console_script_and_the_module_answer():
    script = Path(sys.executable).with_name("noisy-meta-finetune")
    if not script.exists():
        pytest.skip("the package is not installed in this environment (no console script)")
    for command in ([str(script), "--help"], [sys.executable, "-m", "noisy_meta.finetune", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--export-dir" in result.stdout and "--config" in result.stdout
