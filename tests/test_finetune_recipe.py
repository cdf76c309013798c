"""The fine-tuning recipe on the command line: presets, the loss flags, detection before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from noisy_meta import MetaNoiseConfig
from noisy_meta.finetune import build_parser, resolve_meta_config

from finetune_helpers import FAST, metrics, run_example

# ------------------------------------------------------------------------------- fine-tuning defaults


def test_runs_from_pretrained_weights_get_the_fine_tuning_recipe():
    from noisy_meta.config import FINETUNE_PRESET

    parse = build_parser().parse_args
    config, chosen = resolve_meta_config(parse(["--checkpoint", "w.safetensors", "--lr", "0.01"]), 1000)
    for name, value in FINETUNE_PRESET.items():
        assert getattr(config, name) == value and chosen[name] == value
    config, _ = resolve_meta_config(parse(["--pretrained", "--inner-radius", "0.2", "--meta-every", "2"]), 1000)
    assert (config.inner_radius, config.meta_every, config.inner_step) == (0.2, 2, FINETUNE_PRESET["inner_step"])
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
    from noisy_meta.finetune import settings

    def action(argv):
        return settings.RunSettings.from_args(build_parser().parse_args(argv)).clean_before

    assert action([]) == "off"
    assert action(["--pretrained"]) == settings.FINETUNE_CLEANING
    assert action(["--pretrained", "--clean-before", "relabel"]) == "relabel"
    monkeypatch.setattr(settings, "FINETUNE_CLEANING", "remove")  # a recipe that detects before training
    assert action(["--pretrained"]) == "remove"
    assert action(["--pretrained", "--preset", "fast"]) == "off"
    assert action(["--pretrained", "--streaming"]) == "off"


@pytest.mark.parametrize("action", ["remove", "relabel", "mask"])
def test_clean_before_flags_the_training_split_with_the_starting_weights(tiny_mnist, tmp_path, action):
    """A run from --checkpoint: the vote over the starting model's features flags images, the run
    trains on what is left (or relabelled, or on every image with the flagged labels masked), and
    clean_before.json lists what was flagged."""
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
    assert record["threshold"] == "per_class"
    assert record["detection"]["num_noisy"] > 0 and record["detection"]["precision"] is not None
    assert f"--clean-before {action}: {flagged} of 256 samples flagged" in " ".join(result.stdout.split())
    (epoch,) = metrics(output)
    assert epoch["train_samples"] == (256 - flagged if action == "remove" else 256)
    probs = np.load(output / "clean_before_pred_probs.npz")
    assert probs["pred_probs"].shape == (256, 10)
    np.testing.assert_allclose(probs["pred_probs"].sum(axis=1), 1.0)
