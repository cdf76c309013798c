"""Where the fast weights act: ``fast_params`` selections, the shared trunk of the cheap modes (equal to the
general path), its fall-backs, and ``meta_every``."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from noisy_meta import MetaNoiseConfig
from noisy_meta.fast_weights import select_fast_params

from helpers import image_batch, make_wrapper, tiny_resnet


def resnet_batch(batch_size: int = 12, seed: int = 0):
    return image_batch(seed, batch_size)


@pytest.mark.parametrize(
    "name, first, last",
    [("resnet18", "layer4.0.conv1.weight", "fc.bias"), ("test_vit", "blocks.5.norm1.weight", "head.bias")],
)
def test_last_stage_selects_the_last_feature_stage_and_everything_after(name, first, last):

    from noisy_meta import select_fast_params

    model = timm.create_model(name, num_classes=4)
    selected = select_fast_params(model, "last_stage")
    names = [n for n, _ in model.named_parameters()]
    assert selected[0] == first and selected[-1] == last
    assert selected == names[names.index(first) :]  # contiguous: the stage, final norms, the head
    assert set(select_fast_params(model, "head")) < set(selected)


def test_meta_every_runs_the_meta_step_on_every_nth_update_only():
    torch.manual_seed(0)
    model = tiny_resnet()
    wrapper = make_wrapper(model, meta_every=3)
    x, y = resnet_batch()
    weights = [wrapper.step(x, y)["meta_weight"] for _ in range(6)]
    assert weights == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    config = MetaNoiseConfig(ramp_start=4, ramp_end=4, meta_every=2)
    assert [config.meta_weight_at(step) for step in range(8)] == [0, 0, 0, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("mode, same_params", [("head", ["fc.*"]), ("last_stage", ["layer4.*", "fc.*"])])
def test_cheap_modes_share_the_trunk_and_equal_the_general_path(first_order, mode, same_params):
    """`fast_params="head"` / `"last_stage"` (trunk once) == the same parameters selected by pattern (trunk per set)."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    general_model = copy.deepcopy(model)
    shared = make_wrapper(model, fast_params=mode, first_order=first_order)
    general = make_wrapper(general_model, fast_params=same_params, first_order=first_order)
    assert select_fast_params(model, mode) == select_fast_params(general_model, same_params)
    calls = []
    handle = model.layer1.register_forward_hook(
        lambda _m, args, _out: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    for seed in range(3):
        x, y = resnet_batch(seed=seed)
        a, b = shared.step(x.double(), y), general.step(x.double(), y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    handle.remove()
    assert shared.trunk_shared is True
    full_batch = [grad for size, grad in calls if size == 12]
    assert len(full_batch) == 1 + 3  # the one-time check, then the student's forward only, once per step
    skipped = [(size, grad) for size, grad in calls if size != 12]  # last_stage: the trunk before the substitution
    assert all(size == 2 and not grad for size, grad in skipped) and (len(skipped) > 0) == (mode == "last_stage")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


def test_the_shared_trunk_with_the_relative_step_equals_the_general_path():
    """The scale-free step on the last stage: trunk once == the same parameters by pattern (trunk per set)."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    general_model = copy.deepcopy(model)
    step = dict(inner_step="relative", inner_radius=0.02)
    shared = make_wrapper(model, fast_params="last_stage", **step)
    general = make_wrapper(general_model, fast_params=["layer4.*", "fc.*"], **step)
    for seed in range(2):
        x, y = resnet_batch(seed=seed)
        a, b = shared.step(x.double(), y), general.step(x.double(), y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    assert shared.trunk_shared is True
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode, same_params", [("head", ["fc.*"]), ("last_stage", ["layer4.*", "fc.*"])])
def test_cheap_modes_with_a_frozen_trunk(mode, same_params):
    """Linear probing / last-stage tuning: a trunk without trainable parameters still trains the rest."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix.rstrip("*")) for prefix in same_params))
    general_model = copy.deepcopy(model)
    shared, general = make_wrapper(model, fast_params=mode), make_wrapper(general_model, fast_params=same_params)
    x, y = resnet_batch()
    a, b = shared.step(x.double(), y), general.step(x.double(), y)
    assert shared.trunk_shared is True and a["skipped"] == 0.0
    assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


def test_head_mode_falls_back_when_the_model_is_not_its_timm_split():
    torch.manual_seed(0)
    model = tiny_resnet()
    model.forward = lambda x: type(model).forward(model, x) * 2.0  # no longer classifier(pre_logits)
    wrapper = make_wrapper(model, fast_params="head")
    stats = wrapper.step(*resnet_batch())
    assert wrapper.trunk_shared is False and stats["skipped"] == 0.0


@pytest.mark.parametrize("bypass", ["batch mean", "per sample"])
def test_last_stage_falls_back_when_the_input_reaches_the_output_around_the_stage(bypass):
    """A path from the input to the output that skips the last stage: no shared trunk, same training."""
    torch.manual_seed(0)
    model = tiny_resnet()
    extra = {"batch mean": lambda x: x.mean(), "per sample": lambda x: x.flatten(1).mean(1, keepdim=True)}[bypass]
    model.forward = lambda x: type(model).forward(model, x) + extra(x)
    general_model = copy.deepcopy(model)
    general_model.forward = lambda x: type(general_model).forward(general_model, x) + extra(x)
    wrapper = make_wrapper(model, fast_params="last_stage")
    general = make_wrapper(general_model, fast_params=["layer4.*", "fc.*"])
    x, y = resnet_batch()
    a, b = wrapper.step(x, y), general.step(x, y)
    assert wrapper.trunk_shared is False and torch.is_grad_enabled()
    assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-6)


@pytest.mark.parametrize("mode, same_params", [("head", ["fc.*"]), ("last_stage", ["layer4.*", "fc.*"])])
def test_the_step_sized_in_the_predictions_on_the_shared_trunk_equals_the_general_path(mode, same_params):
    """The trial forwards of `FastStepSize` run the suffix on the shared trunk's output: same radius, same update."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    general_model = copy.deepcopy(model)
    sized = dict(inner_step="normalized", inner_radius=0.05, inner_divergence=0.02)
    shared = make_wrapper(model, fast_params=mode, **sized)
    general = make_wrapper(general_model, fast_params=same_params, **sized)
    for seed in range(3):
        x, y = resnet_batch(seed=seed)
        a, b = shared.step(x.double(), y), general.step(x.double(), y)
        assert a["fast_divergence"] == pytest.approx(b["fast_divergence"], rel=1e-8)
        assert a["fast_divergence"] == pytest.approx(0.02, rel=0.3)
    assert shared.trunk_shared is True
    assert shared.core.objective.step_size.scale == pytest.approx(general.core.objective.step_size.scale, rel=1e-8)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-9, atol=1e-11)
