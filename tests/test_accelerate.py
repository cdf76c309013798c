"""Accelerate in one process: prepared models, bf16, fp16 loss scaling, accumulation, clipping."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from noisy_meta import MetaNoiseWrapper, meta_losses
from noisy_meta.fast_weights import InnerStep

from helpers import TinyMLP, assert_states_equal, image_batch, settings, state, tiny_resnet, vector_batch


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_prepared_model_trains_exactly_like_the_plain_wrapper(make_accelerator):
    torch.manual_seed(0)
    model = tiny_resnet()
    plain_model = copy.deepcopy(model)
    accelerator = make_accelerator()
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    wrapper = MetaNoiseWrapper(prepared, optimizer, accelerator=accelerator, **settings())
    plain = MetaNoiseWrapper(plain_model, sgd(plain_model), **settings())
    for seed in range(3):
        assert wrapper.step(*image_batch(seed)) == plain.step(*image_batch(seed))
    assert_states_equal(state(wrapper.module), state(plain_model))
    assert_states_equal(state(wrapper.mentor), state(plain.mentor))


def test_bf16_autocast_runs_the_forwards_in_bf16_and_keeps_fp32_parameters(make_accelerator):
    torch.manual_seed(0)
    model = tiny_resnet()
    reference_model = copy.deepcopy(model)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    accelerator = make_accelerator(mixed_precision="bf16")
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    wrapper = MetaNoiseWrapper(prepared, optimizer, accelerator=accelerator, **settings())
    seen = []
    handle = wrapper.module.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    # 32 px, not 16: PyTorch 2.15's CPU bf16 conv weight gradient is sometimes NaN for a stride-2
    # conv on a 1x1 input (what layer4 of this tiny ResNet sees at 16 px), with or without us.
    batch = image_batch(0, size=32)
    stats = wrapper.step(*batch)
    handle.remove()
    assert stats["skipped"] == 0.0 and all(map(torch.isfinite, map(torch.tensor, stats.values())))
    assert torch.bfloat16 in seen  # the student's forwards ran under autocast
    assert all(p.dtype == torch.float32 for p in wrapper.module.parameters())
    assert all(p.dtype == torch.float32 for p in wrapper.mentor.parameters())

    # The bf16 update points the same way as the fp32 one.
    reference = MetaNoiseWrapper(reference_model, sgd(reference_model), **settings())
    reference.step(*batch)
    delta_bf16 = torch.nn.utils.parameters_to_vector(wrapper.module.parameters()) - start
    delta_fp32 = torch.nn.utils.parameters_to_vector(reference_model.parameters()) - start
    assert F.cosine_similarity(delta_bf16, delta_fp32, dim=0) > 0.95  # bf16 keeps ~3 digits


def test_loss_scaling_is_exact_for_the_inner_and_outer_gradients():
    """A power-of-two GradScaler in fp32 changes nothing: every scale is undone exactly."""
    torch.manual_seed(0)
    model = tiny_resnet()
    scaled_model = copy.deepcopy(model)
    plain = MetaNoiseWrapper(model, sgd(model), **settings())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaled = MetaNoiseWrapper(scaled_model, sgd(scaled_model), scaler=scaler, **settings())
    for seed in range(3):
        a, b = plain.step(*image_batch(seed)), scaled.step(*image_batch(seed))
        assert a == b
    assert scaler.get_scale() == 2.0**12  # no step was skipped
    assert_states_equal(state(model), state(scaled_model))
    assert_states_equal(state(plain.mentor), state(scaled.mentor))


def test_the_inner_loss_is_scaled_before_its_gradient_and_unscaled_after(mlp64, batch64):
    inputs, targets = batch64
    logits = mlp64(inputs)
    mentor = F.log_softmax(torch.randn(12, 3, dtype=torch.float64), dim=1)
    labels = targets.unsqueeze(0)
    names = [name for name, _ in mlp64.named_parameters()]

    def meta_loss(scale):
        return next(meta_losses(mlp64, inputs, logits, labels, mentor, names, InnerStep("sgd", 0.2), scale))

    assert torch.equal(meta_loss(2.0**20), meta_loss(1.0))  # unscaled exactly
    assert not torch.isfinite(meta_loss(2.0**1023 * 2.0**1))  # scaled: the gradient overflowed


def test_an_overflowing_fp16_step_is_skipped_and_lowers_the_scale():
    torch.manual_seed(0)
    model = tiny_resnet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # loss * scale overflows float32
    wrapper = MetaNoiseWrapper(model, sgd(model), scaler=scaler, **settings())
    before, mentor_before = state(model), state(wrapper.mentor)
    stats = wrapper.step(*image_batch(0))
    assert stats["skipped"] == 1.0 and wrapper.num_skipped == 1 and wrapper.num_updates == 0
    assert wrapper.updates.last == "skipped" and not wrapper.updates.accumulating
    assert scaler.get_scale() == 2.0**126
    assert_states_equal(state(model), before)  # parameters and BatchNorm buffers
    assert_states_equal(state(wrapper.mentor), mentor_before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("first_order", [True, False])
def test_an_fp16_run_skips_the_updates_that_overflow_lowers_the_scale_and_carries_on(first_order):
    """CPU autocast in float16 with a GradScaler that starts too high.

    At a large scale the scaled inner gradient overflows and the meta loss comes out NaN (and
    in second order the double backward, which carries the scale twice, overflows too): each
    such update is skipped with student and mentor untouched, counted, and lowers the scale,
    until the scale fits and training carries on. Before, a NaN meta loss skipped the update
    without lowering the scale, so every later update was skipped as well.
    """
    torch.manual_seed(0)
    model = tiny_resnet()
    start = 2.0**18
    scaler = torch.amp.GradScaler("cpu", init_scale=start, growth_interval=1000)
    wrapper = MetaNoiseWrapper(model, sgd(model), scaler=scaler, **settings(first_order=first_order))
    skipped, seen = [], set()
    handle = model.conv1.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    for seed in range(18):  # 12 halvings were needed on one machine, fewer on others (CPU fp16 rounding)
        before, mentor_before, scale = state(model), state(wrapper.mentor), scaler.get_scale()
        with torch.autocast("cpu", dtype=torch.float16):
            stats = wrapper.step(*image_batch(seed, size=32))
        skipped.append(bool(stats["skipped"]))
        if skipped[-1]:
            assert_states_equal(state(model), before)
            assert_states_equal(state(wrapper.mentor), mentor_before)
            assert scaler.get_scale() == scale / 2
        else:
            assert stats["meta_weight"] > 0 and all(map(math.isfinite, stats.values()))
    handle.remove()
    assert seen == {torch.float16}
    assert skipped[0] and wrapper.num_skipped == sum(skipped) and wrapper.num_updates == len(skipped) - sum(skipped)
    assert not any(skipped[-3:]), skipped  # it carries on once the scale fits
    assert scaler.get_scale() < start
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("first_order", [False, True])
def test_gradient_accumulation_equals_the_summed_gradient_of_the_micro_batches(make_accelerator, first_order):
    torch.manual_seed(0)
    model = TinyMLP().double()
    reference_model = copy.deepcopy(model)
    config = settings(num_neighbors=3, first_order=first_order)
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    wrapper = MetaNoiseWrapper(prepared, optimizer, accelerator=accelerator, **config)
    reference_optimizer = sgd(reference_model)
    reference = MetaNoiseWrapper(reference_model, reference_optimizer, **config)

    micro_batches = [vector_batch(seed) for seed in range(4)]
    for index, (inputs, targets) in enumerate(micro_batches):
        with accelerator.accumulate(prepared):
            stats = wrapper.step(inputs, targets)
        assert stats["step"] == (index + 1) // 2  # an update every second micro-batch
        # One object says where the update stands: the first micro-batch of a window holds its gradient.
        assert wrapper.updates.accumulating == (index % 2 == 0)
        assert wrapper.updates.last == ("accumulating" if index % 2 == 0 else "stepped")

    for first in (0, 2):
        reference_optimizer.zero_grad()
        for inputs, targets in micro_batches[first : first + 2]:
            outputs = reference_model(inputs)
            loss = F.cross_entropy(outputs, targets) + reference.meta_loss(inputs, targets, outputs)
            (loss / 2).backward()
        reference_optimizer.step()
        reference.update_mentor()

    for name, value in state(reference_model).items():
        torch.testing.assert_close(state(wrapper.module)[name], value, rtol=1e-12, atol=1e-12)
    for name, value in state(reference.mentor).items():
        torch.testing.assert_close(state(wrapper.mentor)[name], value, rtol=1e-12, atol=1e-12)


def test_gradient_clipping_clips_the_whole_update(mlp64, batch64):
    inputs, targets = batch64
    reference_model = copy.deepcopy(mlp64)
    wrapper = MetaNoiseWrapper(mlp64, sgd(mlp64), **settings(num_neighbors=3, clip_grad=1e-3))
    wrapper.step(inputs, targets)

    optimizer = sgd(reference_model)
    reference = MetaNoiseWrapper(reference_model, optimizer, **settings(num_neighbors=3))
    outputs = reference_model(inputs)
    reference.meta_backward(inputs, targets, outputs)
    F.cross_entropy(outputs, targets).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 1e-3)
    assert norm > 1e-2  # the clipping is active
    optimizer.step()
    for name, value in state(reference_model).items():
        torch.testing.assert_close(state(mlp64)[name], value, rtol=1e-12, atol=1e-14)


def test_own_loop_with_accelerator_backward_equals_step(make_accelerator):
    torch.manual_seed(0)
    model = tiny_resnet()
    own_model = copy.deepcopy(model)
    accelerator = make_accelerator(gradient_accumulation_steps=1)
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    own_prepared, own_optimizer = accelerator.prepare(own_model, sgd(own_model))
    wrapper = MetaNoiseWrapper(prepared, optimizer, accelerator=accelerator, **settings())
    own = MetaNoiseWrapper(own_prepared, own_optimizer, accelerator=accelerator, **settings())
    for seed in range(3):
        inputs, targets = image_batch(seed)
        wrapper.step(inputs, targets)
        with own.forward_context():
            outputs = own_prepared(inputs)
        own.meta_backward(inputs, targets, outputs)
        accelerator.backward(F.cross_entropy(outputs, targets))
        own_optimizer.step()
        own_optimizer.zero_grad()
        own.update_mentor()
    for name, value in state(own.module).items():
        torch.testing.assert_close(state(wrapper.module)[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind, stage, message",
    [
        ("DEEPSPEED", 3, "DEEPSPEED ZeRO-3 mode is not supported: DeepSpeed's engine owns the backward"),
        ("DEEPSPEED", 2, "DEEPSPEED ZeRO-2 mode is not supported"),
        ("FSDP", None, "FSDP mode is not supported: Accelerate shards every parameter, the fast weights too"),
    ],
)
def test_sharding_modes_are_refused_in_one_line_naming_why(mlp64, kind, stage, message):
    """Accelerate's DeepSpeed (any ZeRO stage) and FSDP: refused before training, with the reason and what works."""
    from types import SimpleNamespace

    accelerator = SimpleNamespace(
        distributed_type=SimpleNamespace(name=kind),
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage) if stage else None),
    )
    optimizer = torch.optim.SGD(mlp64.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match=message) as error:
        MetaNoiseWrapper(mlp64, optimizer, accelerator=accelerator)
    assert "\n" not in str(error.value) and "(DDP)" in str(error.value)
