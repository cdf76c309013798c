"""Every error a user can hit: a clear message, and nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper, SecondOrderUnsupportedError

from helpers import FROM_FIRST_UPDATE, TinyMLP, make_wrapper, tiny_resnet


def setup(model=None, **overrides):
    torch.manual_seed(0)
    model = model if model is not None else tiny_resnet()
    wrapper = make_wrapper(model, **{"num_synthetic": 2, **overrides})
    # One good step first, so the optimizer has momentum state that must survive a bad step.
    x = torch.randn(12, 3, 16, 16)
    wrapper.step(x, torch.randint(0, 4, (12,)))
    return wrapper, x


def snapshot(wrapper):
    return (
        copy.deepcopy(wrapper.module.state_dict()),
        copy.deepcopy(wrapper.optimizer.state_dict()),
        copy.deepcopy(wrapper.mentor.state_dict()),
        wrapper.num_updates,
    )


def assert_unchanged(wrapper, before):
    after = snapshot(wrapper)
    for a, b in zip(before[0].values(), after[0].values()):
        assert torch.equal(a, b)
    for key, state in before[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after[1]["state"][key][name])
    for a, b in zip(before[2].values(), after[2].values()):
        assert torch.equal(a, b)
    assert before[3] == after[3]


@pytest.mark.parametrize(
    "targets,error,message",
    [
        (torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]), ValueError, r"targets must lie in \[0, 4\)"),
        (torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, 0, 1, 2]), ValueError, r"from -1 to 3"),
        (torch.zeros(12), TypeError, "integer class indices"),
        (torch.zeros(12, 4, dtype=torch.long), ValueError, r"shape \[B\]"),
        (torch.zeros(11, dtype=torch.long), ValueError, "disagree on the batch size"),
        (torch.zeros(12, dtype=torch.bool), TypeError, "integer class indices"),
    ],
)
def test_bad_targets_are_refused_and_change_nothing(targets, error, message):
    wrapper, x = setup()
    before = snapshot(wrapper)
    with pytest.raises(error, match=message):
        wrapper.step(x, targets)
    assert_unchanged(wrapper, before)


def test_label_range_is_checked_against_the_logits_when_the_model_does_not_say():
    model = TinyMLP(in_features=6, num_classes=3)
    del model.num_classes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = MetaNoiseWrapper(model, optimizer, num_neighbors=3, **FROM_FIRST_UPDATE)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        wrapper.step(torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def test_batch_too_small_for_the_neighbours_says_what_to_do():
    wrapper, x = setup(num_neighbors=10)
    before = snapshot(wrapper)
    with pytest.raises(ValueError, match=r"at least 11 .*drop_last=True.*num_neighbors"):
        wrapper.step(x[:10], torch.zeros(10, dtype=torch.long))
    assert_unchanged(wrapper, before)


class SpatialHead(nn.Module):
    """Returns [B, C, H, W] maps instead of logits, with a BatchNorm that a forward updates."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_model_that_does_not_return_logits_is_refused_and_buffers_restored():
    model = SpatialHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = MetaNoiseWrapper(model, optimizer, num_neighbors=3, **FROM_FIRST_UPDATE)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\[B, C\] logits .* got \[8, 4, 14, 14\]"):
        wrapper.step(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    for a, b in zip(before.values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_loss_skips_the_update_and_changes_nothing():
    wrapper, x = setup()
    before = snapshot(wrapper)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    stats = wrapper.step(bad, torch.zeros(12, dtype=torch.long))
    assert stats["skipped"] == 1.0 and stats["num_skipped"] == 1.0
    assert_unchanged(wrapper, before)
    assert all(p.grad is None for p in wrapper.module.parameters())  # no non-finite gradient left behind
    assert wrapper.step(x, torch.zeros(12, dtype=torch.long))["skipped"] == 0.0


def test_non_finite_meta_gradient_skips_the_update():
    wrapper, x = setup()
    with torch.no_grad():
        wrapper.mentor.fc.weight.fill_(float("inf"))
    before = snapshot(wrapper)
    stats = wrapper.step(x, torch.zeros(12, dtype=torch.long))
    assert stats["skipped"] == 1.0
    assert_unchanged(wrapper, before)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_synthetic=-1), "num_synthetic must be an integer >= 0"),
        (dict(num_synthetic=2.0), "num_synthetic must be an integer"),
        (dict(num_neighbors=True), "num_neighbors must be an integer"),
        (dict(perturb_ratio=0.0), r"perturb_ratio must be in \(0, 1\]"),
        (dict(perturb_ratio=1.5), "perturb_ratio"),
        (dict(inner_lr=-0.1), "inner_lr must be a finite number > 0"),
        (dict(inner_lr=float("nan")), "inner_lr"),
        (dict(meta_weight=-1.0), "meta_weight"),
        (dict(ramp_start=10, ramp_end=5), "ramp_end .* must not come before ramp_start"),
        (dict(ramp_start=-1), "ramp_start must be an integer >= 0"),
        (dict(mentor_decay=1.0), r"mentor_decay must be in \[0, 1\)"),
        (dict(mentor_update="sgd"), "mentor_update"),
        (dict(update_rule="paper"), "update_rule"),
        (dict(seed=1.5), "seed must be an integer or None"),
        (dict(fast_params="body"), "fast_params must be one of"),
        (dict(fast_params=[]), "non-empty glob patterns"),
        (dict(feature_source="teacher"), "feature_source must be one of"),
        (dict(first_order="yes"), "first_order must be a bool"),
    ],
)
def test_invalid_config_is_refused_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        MetaNoiseConfig(**overrides)
    model = tiny_resnet()
    with pytest.raises(ValueError, match=message):
        MetaNoiseWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), **overrides)


def test_unknown_override_and_wrong_argument_types():
    model = tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unknown MetaNoiseConfig field.*num_sets"):
        MetaNoiseWrapper(model, optimizer, num_sets=3)
    with pytest.raises(TypeError, match="config must be a MetaNoiseConfig"):
        MetaNoiseWrapper(model, optimizer, {"num_synthetic": 3})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        MetaNoiseWrapper(lambda x: x, optimizer)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        MetaNoiseWrapper(model, [optimizer])
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        MetaNoiseWrapper(model, optimizer, fast_params=["nothing.*"])
    with pytest.raises(ValueError, match="fast_params='head' needs a timm model"):
        MetaNoiseWrapper(TinyMLP(), optimizer, fast_params="head")
    with pytest.raises(ValueError, match="fast_params='last_stage' needs a timm model"):
        MetaNoiseWrapper(TinyMLP(), optimizer, fast_params="last_stage")
    with pytest.raises(ValueError, match="meta_every must be an integer >= 1"):
        MetaNoiseWrapper(model, optimizer, meta_every=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="sets_per_pass must be an integer >= 1"):
            MetaNoiseWrapper(model, optimizer, sets_per_pass=bad)


def test_op_without_double_backward_is_named_with_the_fix():
    class FunctionalHardsigmoidNet(TinyMLP):
        def forward(self, x):
            return self.fc2(F.hardsigmoid(self.fc1(x)))

    model = FunctionalHardsigmoidNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = MetaNoiseWrapper(model, optimizer, num_neighbors=3, **FROM_FIRST_UPDATE)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SecondOrderUnsupportedError, match=r"hardsigmoid.*first_order=True"):
        wrapper.step(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    first_order = MetaNoiseWrapper(model, optimizer, num_neighbors=3, **FROM_FIRST_UPDATE, first_order=True)
    assert first_order.step(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))["skipped"] == 0.0


def test_data_parallel_is_refused_with_a_pointer_to_ddp():
    model = tiny_resnet()
    with pytest.raises(NotImplementedError, match="DataParallel.*DistributedDataParallel"):
        MetaNoiseWrapper(nn.DataParallel(model), torch.optim.SGD(model.parameters(), lr=0.1))


def test_sequential_rule_refuses_gradient_accumulation(make_accelerator):
    model = tiny_resnet()
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="sequential.*accumulat"):
        MetaNoiseWrapper(model, optimizer, update_rule="sequential", accelerator=accelerator)


def test_accelerator_and_scaler_together_are_refused(make_accelerator):
    model = tiny_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="either an accelerator or a scaler"):
        MetaNoiseWrapper(model, optimizer, accelerator=make_accelerator(), scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("field, value", [("clip_grad", 0.0), ("clip_grad", float("nan")), ("dist_bn", "sync")])
def test_update_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        MetaNoiseConfig(**{field: value})
