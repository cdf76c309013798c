"""Variants of the meta step: the consistency-only ablation (``num_synthetic=0``) and several synthetic sets in
one batched pass (``sets_per_pass``)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from noisy_meta.fast_weights import forward_with_cloned_buffers

from helpers import TinyMLP, image_batch, make_wrapper, tiny_resnet


def resnet_batch(batch_size: int = 12, seed: int = 0):
    return image_batch(seed, batch_size)


# ------------------------------------------------------------------ num_synthetic=0: the consistency-only ablation


@pytest.mark.parametrize("fast_params, update_rule", [("all", "joint"), ("head", "joint"), ("all", "sequential")])
def test_no_synthetic_sets_is_consistency_with_the_mentor_at_the_student_weights(fast_params, update_rule):
    """num_synthetic=0: CE + w * KL(mentor || student) on the real forward, no neighbours, no fast weights."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    reference = copy.deepcopy(model)
    wrapper = make_wrapper(
        model,
        num_synthetic=0,
        meta_weight=0.7,
        fast_params=fast_params,
        update_rule=update_rule,
        mentor_decay_ramp=0.5,
        mentor_decay=0.5,
        mentor_warmup=False,
    )
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    mentor = copy.deepcopy(reference).eval()
    for seed in range(3):
        x, y = resnet_batch(seed=seed)
        x = x.double()
        stats = wrapper.step(x, y)
        with torch.no_grad():
            mentor_log_probs = F.log_softmax(mentor(x), dim=1)

        def consistency(logits, mentor_log_probs=mentor_log_probs):
            return F.kl_div(F.log_softmax(logits, 1), mentor_log_probs, log_target=True, reduction="batchmean")

        if update_rule == "joint":
            logits = reference(x)
            meta = consistency(logits)
            (F.cross_entropy(logits, y) + 0.7 * meta).backward()
            optimizer.step()
        else:  # the meta update on cloned BN buffers, then the CE update
            meta = consistency(forward_with_cloned_buffers(reference, dict(reference.named_parameters()), x))
            (0.7 * meta).backward()
            optimizer.step()
            optimizer.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # the mentor's EMA (decay 0.5), parameters and buffers
            for (_, m), (_, s) in zip(mentor.state_dict().items(), reference.state_dict().items()):
                m.copy_(s if not m.is_floating_point() else 0.5 * m + 0.5 * s)
        assert stats["labels_changed"] == 0.0 and stats["meta_weight"] == 0.7
        assert stats["meta_loss"] == pytest.approx(float(meta.detach()), rel=1e-9) and stats["meta_loss"] > 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-9, atol=1e-11)


def test_no_synthetic_sets_needs_no_neighbours():
    torch.manual_seed(0)
    wrapper = make_wrapper(tiny_resnet(), num_synthetic=0, num_neighbors=10)
    x, y = resnet_batch()
    stats = wrapper.step(x[:4], y[:4])  # fewer samples than num_neighbors: fine without neighbour search
    assert stats["skipped"] == 0.0


# ------------------------------------------------------------------ sets_per_pass: several sets in one batched pass


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("fast_params", ["all", "last_stage", "head"])
def test_batched_sets_give_the_sequential_update_on_a_batchnorm_resnet(first_order, fast_params):
    """sets_per_pass=M: the same parameters, BatchNorm buffers and mentor as one set at a time."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    batched_model = copy.deepcopy(model)
    one_at_a_time = make_wrapper(model, first_order=first_order, fast_params=fast_params)
    batched = make_wrapper(batched_model, first_order=first_order, fast_params=fast_params, sets_per_pass=3)
    calls = []
    handle = batched_model.layer4.register_forward_hook(lambda *args: calls.append(1))
    for seed in range(2):
        x, y = resnet_batch(seed=seed)
        a, b = one_at_a_time.step(x.double(), y), batched.step(x.double(), y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-9) and a["meta_loss"] > 0
    handle.remove()
    # all: per step the student's forward and all 3 fast forwards in one vmap (one at a time: 1 + 3);
    # head: the one-time trunk check, then the student's forward; last_stage: the check (model and
    # resumed model), then per step the student, the suffix on the trunk output, one vmap
    assert len(calls) == {"all": 2 * 2, "head": 1 + 2, "last_stage": 2 + 2 * 3}[fast_params]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, batched_model.state_dict()[name], rtol=1e-9, atol=1e-11)
    for name, value in one_at_a_time.mentor.state_dict().items():
        torch.testing.assert_close(value, batched.mentor.state_dict()[name], rtol=1e-9, atol=1e-11)


def test_batched_sets_draw_dropout_per_set():
    torch.manual_seed(0)
    model = timm.create_model(
        "resnet18", num_classes=4, layers=(1, 1, 1, 1), stem_width=8, channels=(8, 16, 16, 32), drop_rate=0.3
    )
    wrapper = make_wrapper(model, sets_per_pass=3)
    stats = wrapper.step(*resnet_batch())  # vmap refuses random ops unless told how to draw them
    assert stats["skipped"] == 0.0 and math.isfinite(stats["meta_loss"])


def test_batched_sets_take_batchnorm_inputs_in_another_dtype_than_its_statistics():
    """CUDA autocast gives BatchNorm bf16 activations and float32 statistics: the plain kernel takes the mix,
    vmap's batching rule did not (seen on an H200); the batched pass now equals the sequential one."""

    class HalfActivations(torch.nn.Module):  # a convolution's output as autocast leaves it
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 4)

        def forward(self, x):
            hidden = self.bn(self.conv(x).bfloat16())
            assert hidden.dtype == torch.bfloat16  # what the layer after BatchNorm receives is unchanged
            return self.fc(hidden.float().mean((2, 3)))

    torch.manual_seed(0)
    model = HalfActivations()
    batched_model = copy.deepcopy(model)
    x, y = resnet_batch()
    one_at_a_time = make_wrapper(model).step(x, y)
    batched = make_wrapper(batched_model, sets_per_pass=3).step(x, y)
    assert batched["meta_loss"] == pytest.approx(one_at_a_time["meta_loss"], rel=2e-2)
    for hook_dict in (batched_model.bn._forward_pre_hooks, batched_model.bn._forward_hooks):
        assert not hook_dict  # the cast is there during the batched pass only


def test_a_model_that_vmap_cannot_run_is_named_with_the_fix():
    class ItemCallingMLP(TinyMLP):
        def forward(self, x):
            hidden = torch.tanh(self.fc1(x))
            if hidden.isnan().any().item():  # .item() of a tensor that differs per set: no batched form
                raise ValueError("NaN activations")
            return self.fc2(hidden)

    torch.manual_seed(0)
    model = ItemCallingMLP()
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    before = copy.deepcopy(model.state_dict())
    wrapper = make_wrapper(model, num_neighbors=3, sets_per_pass=2)
    with pytest.raises(RuntimeError, match="sets_per_pass > 1 runs the fast forwards under torch.func.vmap"):
        wrapper.step(x, y)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())
    assert make_wrapper(ItemCallingMLP(), num_neighbors=3).step(x, y)["skipped"] == 0.0  # one set per pass works
