"""The cheaper meta step: a meta sub-batch, a compensated meta_every, and the `fast` preset."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_meta_gradient import ALPHA, mlp_forward, mlp_params, perturb_mentor, reference_meta_objective
from test_meta_gradient import make_wrapper as make_mlp_wrapper

from noisy_meta import MetaNoiseConfig, nearest_neighbors, neighbor_label_transfer
from noisy_meta.config import FAST_PRESET

from helpers import buffers, image_batch, make_wrapper, tiny_resnet


def subset_and_synthetic(wrapper, inputs, targets, seed, size):
    """What `meta_batch_fraction` documents: ``size`` random samples drawn first, then their labels."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.rand(targets.shape[0], generator=generator).argsort()[:size]
    x, y = inputs[index], targets[index]
    with torch.no_grad():
        mentor_logits = wrapper.mentor(x)
    cfg = wrapper.config
    neighbors = nearest_neighbors(mentor_logits, cfg.num_neighbors)
    labels = neighbor_label_transfer(y, neighbors, cfg.num_synthetic, cfg.perturb_ratio, generator).labels
    return index, labels, F.log_softmax(mentor_logits, dim=1)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_batch_fraction_is_the_meta_step_on_a_random_subset(mlp64, batch64, first_order):
    """One joint update == a step on CE(whole batch) + w * J(random half, its own synthetic labels)."""
    x, y = batch64
    weight = 0.7
    initial = [p.detach().clone() for p in mlp_params(mlp64)]
    wrapper = make_mlp_wrapper(mlp64, first_order=first_order, meta_weight=weight, meta_batch_fraction=0.5)
    perturb_mentor(wrapper)
    index, labels, mentor_log_probs = subset_and_synthetic(wrapper, x, y, seed=11, size=6)
    assert labels.shape == (4, 6)

    params = [p.clone().requires_grad_(True) for p in initial]
    ce = F.cross_entropy(mlp_forward(params, x), y)
    meta = reference_meta_objective(params, x[index], labels, mentor_log_probs, ALPHA, first_order)
    grads = torch.autograd.grad(ce + weight * meta, params)

    stats = wrapper.step(x, y)
    assert stats["meta_loss"] == pytest.approx(meta.item(), rel=1e-10)
    for p, p0, g in zip(mlp_params(mlp64), initial, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("api", ["meta_backward", "meta_loss"])
def test_meta_batch_fraction_in_your_own_loop(mlp64, batch64, api):
    """`meta_backward` and `meta_loss` run the meta step on the same subset `step` would."""
    x, y = batch64
    wrapper = make_mlp_wrapper(mlp64, meta_batch_fraction=0.5)
    perturb_mentor(wrapper)
    index, labels, mentor_log_probs = subset_and_synthetic(wrapper, x, y, seed=11, size=6)
    reference = reference_meta_objective(mlp_params(mlp64), x[index], labels, mentor_log_probs, ALPHA, False)
    expected = torch.autograd.grad(reference, mlp_params(mlp64))
    if api == "meta_backward":
        assert wrapper.meta_backward(x, y, mlp64(x))["meta_loss"] == pytest.approx(reference.item(), rel=1e-10)
    else:
        loss = wrapper.meta_loss(x, y, mlp64(x))
        assert loss.item() == pytest.approx(reference.item(), rel=1e-10)
        loss.backward()
    for p, g in zip(mlp_params(mlp64), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode, same_params", [("head", ["fc.*"]), ("last_stage", ["layer4.*", "fc.*"])])
def test_meta_subset_on_a_shared_trunk_equals_the_general_path(mode, same_params):
    """Head / last-stage mode on a subset (the trunk's output indexed) == the whole model run on that subset.

    In eval mode BatchNorm normalises with its running statistics, so a sample's trunk output
    does not depend on which batch it came in and the two paths compute the same thing.
    """
    torch.manual_seed(0)
    model = tiny_resnet().double().eval()
    general_model = copy.deepcopy(model)
    settings = dict(meta_batch_fraction=0.5, num_neighbors=4)
    shared = make_wrapper(model, fast_params=mode, **settings)
    general = make_wrapper(general_model, fast_params=same_params, **settings)
    for seed in range(2):
        x, y = image_batch(seed, 12)
        a, b = shared.step(x.double(), y), general.step(x.double(), y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    assert shared.fast_suffix == mode
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fast_params", ["all", "head", "last_stage"])
def test_meta_subset_leaves_batchnorm_statistics_as_plain_training(fast_params):
    """The subset's fast passes never touch the student's running statistics."""
    torch.manual_seed(0)
    model = tiny_resnet()
    plain = copy.deepcopy(model)
    x, y = image_batch(0, 12)
    wrapper = make_wrapper(model, fast_params=fast_params, meta_batch_fraction=0.5, num_neighbors=4)
    stats = wrapper.step(x, y)
    assert stats["meta_weight"] > 0 and stats["skipped"] == 0.0
    plain(x)
    bn_buffers = {k: v for k, v in buffers(plain).items() if "running" in k or "num_batches" in k}
    assert bn_buffers
    for name, value in bn_buffers.items():
        torch.testing.assert_close(buffers(model)[name], value, rtol=0, atol=0)


def test_meta_batch_size_keeps_enough_samples_for_the_neighbours():
    config = MetaNoiseConfig(num_neighbors=10, meta_batch_fraction=0.25)
    assert config.meta_batch_size(128) == 32
    assert config.meta_batch_size(32) == 11  # k + 1, not 8
    assert config.meta_batch_size(10) == 10  # never more than the batch
    assert MetaNoiseConfig(num_neighbors=2, meta_batch_fraction=0.5).meta_batch_size(5) == 3  # 2.5 rounds up
    assert MetaNoiseConfig().meta_batch_size(7) == 7


def test_a_whole_batch_fraction_draws_nothing(mlp64, batch64):
    """``meta_batch_fraction=1`` (and any fraction that keeps the whole batch) leaves the labels' stream as it was."""
    x, y = batch64
    runs = []
    for fraction in (1.0, 0.99):
        model = copy.deepcopy(mlp64)
        wrapper = make_mlp_wrapper(model, meta_batch_fraction=fraction)
        wrapper.step(x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_compensated_meta_every_keeps_the_average_weight():
    config = MetaNoiseConfig(ramp_start=0, ramp_end=0, meta_every=4, meta_weight=0.5, compensate_meta_every=True)
    weights = [config.meta_weight_at(step) for step in range(8)]
    assert weights == [2.0, 0, 0, 0, 2.0, 0, 0, 0]
    assert sum(weights) / len(weights) == 0.5
    uncompensated = config.with_overrides(compensate_meta_every=False)
    assert [uncompensated.meta_weight_at(step) for step in range(4)] == [0.5, 0, 0, 0]
    ramping = config.with_overrides(ramp_start=0, ramp_end=8)
    assert ramping.meta_weight_at(4) == pytest.approx(2.0 * torch.tensor(-5 * 0.5**2).exp().item())


def test_sqrt_compensation_keeps_the_noise_of_one_set_per_update():
    config = MetaNoiseConfig(ramp_start=0, ramp_end=0, meta_every=4, meta_weight=0.5, compensate_meta_every="sqrt")
    assert config.meta_step_factor == 2.0
    assert [config.meta_weight_at(step) for step in range(8)] == [1.0, 0, 0, 0, 1.0, 0, 0, 0]
    # The sum of squared weights over a cycle (the meta gradient's variance) equals one set on every update's.
    every_update = config.with_overrides(meta_every=1)
    assert every_update.meta_step_factor == 1.0
    variance = [sum(c.meta_weight_at(s) ** 2 for s in range(4)) for c in (config, every_update)]
    assert variance[0] == variance[1]
    ramping = config.with_overrides(ramp_start=0, ramp_end=8)
    assert ramping.meta_weight_at(4) == pytest.approx(1.0 * math.exp(-5 * 0.5**2))
    assert MetaNoiseConfig(meta_every=5, compensate_meta_every="sqrt").meta_step_factor == pytest.approx(5**0.5)


def test_compensated_meta_every_in_a_wrapper():
    torch.manual_seed(0)
    wrapper = make_wrapper(tiny_resnet(), meta_every=3, compensate_meta_every=True)
    x, y = image_batch(0, 12)
    assert [wrapper.step(x, y)["meta_weight"] for _ in range(4)] == [3.0, 0.0, 0.0, 3.0]


def test_fast_preset_fields_and_overrides():
    config = MetaNoiseConfig.fast()
    for name, value in FAST_PRESET.items():
        assert getattr(config, name) == value
    assert config.first_order is False and config.compensate_meta_every is True
    tuned = MetaNoiseConfig.fast(inner_lr=0.05, meta_every=2)
    assert tuned.inner_lr == 0.05 and tuned.meta_every == 2 and tuned.meta_batch_fraction == config.meta_batch_fraction
    with pytest.raises(TypeError, match="unknown MetaNoiseConfig field"):
        MetaNoiseConfig.fast(meta_evry=2)
    with pytest.raises(ValueError, match="meta_batch_fraction must be in"):
        MetaNoiseConfig.fast(meta_batch_fraction=0.0)
    # A config of your own made cheap: its fields kept, the preset's applied.
    mine = MetaNoiseConfig(inner_lr=0.02, num_neighbors=5).with_overrides(**FAST_PRESET)
    assert mine.inner_lr == 0.02 and mine.num_neighbors == 5 and mine.meta_every == FAST_PRESET["meta_every"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("meta_batch_fraction", 0.0, "meta_batch_fraction must be in \\(0, 1\\], got 0.0"),
        ("meta_batch_fraction", 1.5, "meta_batch_fraction must be in \\(0, 1\\], got 1.5"),
        ("meta_batch_fraction", float("nan"), "meta_batch_fraction must be in"),
        ("meta_batch_fraction", True, "meta_batch_fraction must be in"),
        ("compensate_meta_every", 1, "compensate_meta_every must be True, False or 'sqrt', got 1"),
        ("compensate_meta_every", "mean", "compensate_meta_every must be True, False or 'sqrt', got 'mean'"),
    ],
)
def test_invalid_affordable_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        MetaNoiseConfig(**{field: value})


# ------------------------------------------------------------------------------- the command line


def resolved(argv):
    """The MetaNoiseConfig the finetune command line resolves for ``argv`` (with the data set's defaults)."""
    from noisy_meta.finetune import build_parser, resolve_meta_config

    return resolve_meta_config(build_parser().parse_args(argv), total_updates=1000)


def test_preset_fast_replaces_the_data_set_and_fine_tuning_defaults():
    config, chosen = resolved(["--preset", "fast"])  # the embedded data set: first order, M = 5 by default
    for name, value in FAST_PRESET.items():
        assert getattr(config, name) == value and chosen[name] == value, name
    config, chosen = resolved(["--preset", "fast", "--checkpoint", "w.safetensors", "--lr", "0.01"])
    assert config.num_synthetic == FAST_PRESET["num_synthetic"] and config.inner_lr == pytest.approx(0.01)


def test_flags_win_over_the_preset():
    config, chosen = resolved(["--preset", "fast", "--meta-every", "2", "--first-order", "--num-synthetic", "3"])
    assert (config.meta_every, config.first_order, config.num_synthetic) == (2, True, 3)
    assert "meta_every" not in chosen and config.meta_batch_fraction == FAST_PRESET["meta_batch_fraction"]


def test_preset_full_is_the_papers_meta_step():
    config, chosen = resolved(["--preset", "full"])
    assert (config.num_synthetic, config.first_order) == (5, True)  # the embedded data set's defaults
    assert (config.meta_every, config.meta_batch_fraction, config.compensate_meta_every) == (1, 1.0, False)
    config, _ = resolved(["--preset", "full", "--dataset", "my/images", "--checkpoint", "w.safetensors"])
    assert (config.num_synthetic, config.first_order) == (3, False)  # the fine-tuning defaults


def test_a_bad_preset_or_fraction_is_one_line(tmp_path):
    import subprocess
    import sys

    for argv, message in (
        (["--preset", "cheap"], "argument --preset: invalid choice: 'cheap'"),
        (["--meta-batch-fraction", "0"], "meta-batch-fraction"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "noisy_meta.finetune", *argv, "--output-dir", str(tmp_path / "run")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and result.stdout == "", argv
        (line,) = result.stderr.strip().splitlines()
        assert message in line, line
