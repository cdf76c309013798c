"""The fine-tuning run's data: loading, splits, label columns, bad images, open-set noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets import Image, load_from_disk

from noisy_meta.finetune import main
from noisy_meta.finetune.data import collate, embedded_mnist, load_image_dataset, prepare_splits
from noisy_meta.finetune.models import create_model
from noisy_meta.finetune.settings import ModelSettings
from noisy_meta.labels.noise import OUTSIDE

from finetune_helpers import FAST, metrics, run_example, split_args
from helpers import TinyMLP, make_wrapper

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

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "weights.safetensors"
    save_weights(source, path)
    model = create_model(ModelSettings("test_resnet", checkpoint=str(path)), num_classes=3)
    assert model.num_classes == 3
    loaded, saved = model.state_dict(), source.state_dict()
    head = {name for name, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    for name in saved:
        if name not in head:
            assert torch.equal(loaded[name], saved[name]), name
    with pytest.raises(FileNotFoundError, match="--checkpoint: no file"):
        create_model(ModelSettings("resnet18", checkpoint=str(tmp_path / "missing.pt")), num_classes=3)


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
    from noisy_meta.finetune.trainer import validate

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


# ------------------------------------------------------------------- split inference, class names, the carve


def test_parquet_splits_are_inferred_as_hugging_face_datasets_infers_them(tmp_path):
    from noisy_meta.finetune.data import parquet_files_by_split

    named = tmp_path / "named"
    named.mkdir()
    for name in ("train-00000-of-00002", "train-00001-of-00002", "dev-00000", "test"):
        (named / f"{name}.parquet").touch()
    found = parquet_files_by_split(str(named))
    assert {split: [Path(p).name for p in paths] for split, paths in found.items()} == {
        "train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
        "validation": ["dev-00000.parquet"],  # a substring test put it in training
        "test": ["test.parquet"],
    }
    (named / "contest.parquet").touch()  # "test" inside a word names no split
    with pytest.raises(ValueError, match=r"1 parquet file\(s\) name no split while others do \(contest.parquet\)"):
        parquet_files_by_split(str(named))
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    for name in ("part-0", "part-1"):
        (unnamed / f"{name}.parquet").touch()
    assert sorted(parquet_files_by_split(str(unnamed))) == ["train"]
    assert parquet_files_by_split(str(named / "test.parquet")) == {"train": [str(named / "test.parquet")]}
    globbed = parquet_files_by_split(str(named / "*-0000*.parquet"))
    assert sorted(globbed) == ["train", "validation"] and len(globbed["train"]) == 2


def test_string_labels_become_one_class_label_with_their_names(tiny_mnist):
    from datasets import ClassLabel, DatasetDict

    from noisy_meta.finetune.data import encode_string_labels

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    data = load_from_disk(str(tiny_mnist))
    named = DatasetDict(
        {
            split: data[split]
            .map(lambda row: {"name": words[row["label"]]})
            .remove_columns("label")
            .rename_column("name", "label")
            for split in data
        }
    )
    named["test"] = named["test"].filter(lambda row: row["label"] not in ("zero", "one"))  # fewer classes there
    assert named["train"].features["label"].dtype == "string"
    splits = prepare_splits(named, **split_args(noise="none", noise_rate=0.0))
    assert splits.class_names == sorted(words) and splits.num_classes == 10
    digits = np.asarray(data["train"]["label"])[np.asarray(splits.train["index"])]
    assert [splits.class_names[i] for i in splits.train["label"]] == [words[d] for d in digits]
    test_digits = [d for d in data["test"]["label"] if d > 1]
    test_names = [splits.class_names[i] for i in splits.test["label"]]
    assert test_names == [words[d] for d in test_digits]  # the same ids in every split, whatever it holds
    encoded = encode_string_labels(named, ["train", "test"], ["label"])
    assert encoded["test"].features["label"] == encoded["train"].features["label"] == ClassLabel(names=sorted(words))


def test_the_validation_carve_keeps_every_class_in_proportion(tiny_mnist):
    data = load_from_disk(str(tiny_mnist))
    skewed = data["train"].filter(lambda row, i: row["label"] != 7 or i % 8 == 0, with_indices=True)
    splits = prepare_splits({"train": skewed, "test": data["test"]}, **split_args(noise="none", noise_rate=0.0))
    counts = np.bincount(np.asarray(skewed["label"]), minlength=10)
    carved = np.bincount(np.asarray(splits.validation["label"]), minlength=10)
    assert carved.sum() == round(0.25 * len(skewed)) and len(splits.train) + carved.sum() == len(skewed)
    assert np.all(np.abs(carved - 0.25 * counts) < 1), (carved, counts)  # each class within one image of its share
    assert not set(splits.train["index"]) & set(splits.validation["index"])
    again = prepare_splits({"train": skewed, "test": data["test"]}, **split_args(noise="none", noise_rate=0.0))
    assert again.validation["index"] == splits.validation["index"]  # seeded
    with pytest.raises(ValueError, match="--val-fraction 0.001 of the .* carves 0 for validation"):
        prepare_splits(data, **split_args(noise="none", noise_rate=0.0, val_fraction=0.001))


def test_only_the_main_process_decodes_images_to_find_bad_ones(folder_with_bad_images, monkeypatch, tmp_path):
    """Every rank decoded every image; now the main one scans and the others receive its list."""
    from types import SimpleNamespace

    from rich.console import Console

    from noisy_meta.finetune import data as run_data
    from noisy_meta.finetune.cli import parse_settings
    from noisy_meta.finetune.data import BadImage
    from noisy_meta.finetune.settings import RunContext

    output = ["--output-dir", str(tmp_path / "run")]
    settings = parse_settings(["--dataset", str(folder_with_bad_images), "--bad-images", "skip", *FAST, *output])
    data = load_image_dataset(str(folder_with_bad_images))
    scans, sent = [], []
    found = [BadImage("train", 3, "x.png", "OSError: truncated")]
    monkeypatch.setattr(run_data, "find_bad_images", lambda *args: scans.append(args[1]) or found)
    monkeypatch.setattr(run_data, "broadcast_object_list", lambda objects: sent.append(objects) or [found])
    for is_main in (False, True):
        accelerator = SimpleNamespace(is_main_process=is_main, num_processes=2)
        context = RunContext(settings, accelerator, Console(quiet=True))
        kept = run_data._handle_bad_images(context, data, ["train"])
        assert len(kept["train"]) == len(data["train"]) - 1
        assert scans == ([] if not is_main else ["train"])
    assert sent == [[None], [found]]  # the other rank sends nothing, the main one its findings
