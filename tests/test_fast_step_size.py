"""The fast step sized in the predictions (``inner_divergence``): the rescaling law against a reference,
the target reached, absurd radii skipped and counted, the state resumed; and ``label_mask``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_meta_gradient import (
    RADIUS,
    expected_synthetic,
    make_wrapper,
    mlp_forward,
    mlp_params,
    perturb_mentor,
    reference_with_step,
)

from noisy_meta import MetaNoiseConfig
from noisy_meta.fast_weights import MAX_RELATIVE_STEP, prediction_divergence

import helpers

TARGET = 0.02


def normalized(radius):
    def step(params, grads):
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        return [p - radius * g / norm for p, g in zip(params, grads)]

    return step


def kl_sized_wrapper(model, **overrides):
    settings = dict(inner_step="normalized", inner_radius=RADIUS, inner_divergence=TARGET)
    return make_wrapper(model, **{**settings, **overrides})


def trial_divergence(params, x, labels, radius):
    """KL(student || student after the normalized step of radius ``radius`` on ``labels``), written out."""
    logits = mlp_forward(params, x)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
    stepped = normalized(radius)(params, grads)
    log_p, log_q = F.log_softmax(logits, 1), F.log_softmax(mlp_forward(stepped, x), 1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean().detach())


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("sets_per_pass", [1, 3])
def test_meta_gradient_equals_reference_at_the_rescaled_radius(mlp64, batch64, first_order, sets_per_pass):
    """The trial at the configured radius on the first set, r* = r sqrt(target / D), then the reference objective
    with every set stepped by r* (a constant to the meta-gradient)."""
    x, y = batch64
    params = mlp_params(mlp64)
    probe = kl_sized_wrapper(copy.deepcopy(mlp64))
    torch.manual_seed(3)
    perturb_mentor(probe)  # the same mentor as the wrapper's below, so the same neighbours and labels
    first_labels = expected_synthetic(probe, x, y, seed=11)[0][0]
    measured = trial_divergence(params, x, first_labels, RADIUS)
    target = 1.2 * measured  # within TRIAL_TOLERANCE: one trial, then the quadratic law
    wrapper = kl_sized_wrapper(mlp64, first_order=first_order, sets_per_pass=sets_per_pass, inner_divergence=target)
    torch.manual_seed(3)
    perturb_mentor(wrapper)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)
    radius = RADIUS * math.sqrt(1.2)
    reference = reference_with_step(params, x, labels, mentor_log_probs, normalized(radius), first_order, [True] * 4)
    expected = torch.autograd.grad(reference, params)

    stats = wrapper.meta_backward(x, y, mlp64(x))
    assert wrapper.core.objective.step_size.scale == pytest.approx(radius / RADIUS, rel=1e-9)
    assert stats["meta_loss"] == pytest.approx(reference.item(), rel=1e-9)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12)
    realised = trial_divergence(params, x, labels[0], radius)
    assert stats["fast_divergence"] == pytest.approx(realised, rel=1e-9)
    norm = math.sqrt(sum(float((p**2).sum()) for p in params))
    assert stats["fast_step"] == pytest.approx(radius / norm, rel=1e-9)


@pytest.mark.parametrize("inner_step", ["normalized", "adaptive", "relative", "sgd"])
def test_the_divergence_reaches_its_target_whatever_the_configured_size(inner_step):
    """Started 100x too small or too large, the divergence is near the target from the first meta step on (more
    trials on the first), and the radius found does not depend on where it started."""
    x, y = helpers.image_batch(batch_size=16)
    radii = []
    for start in (1e-4, 1e-2, 1.0):
        torch.manual_seed(0)
        model = helpers.tiny_resnet()
        wrapper = kl_sized_wrapper(model, inner_step=inner_step, inner_radius=start, inner_lr=start, first_order=True)
        divergences = [wrapper.meta_backward(x, y, model(x))["fast_divergence"] for _ in range(3)]
        assert all(d == pytest.approx(TARGET, rel=0.3) for d in divergences), divergences
        radii.append(wrapper.core.objective.step_size.scale * start)
    assert radii[0] == pytest.approx(radii[2], rel=0.25)


def test_an_absurd_radius_is_clipped_counted_and_not_trained_on(mlp64, batch64):
    """A target the predictions cannot reach within MAX_RELATIVE_STEP of the weights' norm: no meta gradient,
    the skip counted, the scale clipped to the largest step."""
    x, y = batch64
    wrapper = kl_sized_wrapper(mlp64, inner_divergence=1e6)
    stats = wrapper.meta_backward(x, y, mlp64(x))
    assert all(p.grad is None or not p.grad.any() for p in mlp64.parameters())
    assert stats["meta_loss"] == 0.0 and math.isnan(stats["fast_divergence"]) and math.isnan(stats["fast_step"])
    sizer = wrapper.core.objective.step_size
    assert sizer.num_clipped == wrapper.fast_steps_clipped == 1
    norm = math.sqrt(sum(float((p**2).sum()) for p in mlp_params(mlp64)))
    assert sizer.scale * RADIUS / norm == pytest.approx(MAX_RELATIVE_STEP, rel=1e-9)
    # the update still trains on the labels: step() makes the cross-entropy update alone
    before = copy.deepcopy(mlp64)
    stats = wrapper.step(x, y)
    plain = torch.optim.SGD(before.parameters(), lr=0.1)
    F.cross_entropy(before(x), y).backward()
    plain.step()
    helpers.assert_states_close((mlp64, before), rtol=1e-10, atol=1e-12)
    assert sizer.num_clipped == 2 and stats["skipped"] == 0.0


def test_the_radius_is_resumed_from_the_state_dict(mlp64, batch64):
    x, y = batch64
    wrapper = kl_sized_wrapper(mlp64)
    wrapper.step(x, y)
    state = copy.deepcopy(wrapper.state_dict())
    assert state["fast_step_size"] == {"scale": wrapper.core.objective.step_size.scale, "num_clipped": 0}
    twin_model = copy.deepcopy(mlp64)
    twin = kl_sized_wrapper(twin_model)
    twin.optimizer.load_state_dict(wrapper.optimizer.state_dict())
    twin.load_state_dict(state)
    assert twin.core.objective.step_size.scale == wrapper.core.objective.step_size.scale
    for _ in range(2):
        wrapper.step(x, y)
        twin.step(x, y)
    helpers.assert_states_close((mlp64, twin_model), rtol=0, atol=0)
    older = {k: v for k, v in state.items() if k != "fast_step_size"}  # a checkpoint from before 0.3 loads
    kl_sized_wrapper(copy.deepcopy(mlp64)).load_state_dict(older)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_inner_divergence_is_validated(value):
    with pytest.raises(ValueError, match="inner_divergence must be a finite number > 0 or None"):
        MetaNoiseConfig(inner_divergence=value)


def test_prediction_divergence_is_the_kl_from_the_student():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    fast = torch.tensor([[1.0, 0.5, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    p, q = logits.softmax(1), fast.softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert float(prediction_divergence(logits, fast)) == pytest.approx(float(expected), rel=1e-12)
    assert float(prediction_divergence(logits, logits)) == 0.0


# ---------------------------------------------------------------------- label_mask


def test_label_mask_keeps_the_masked_labels_out_of_the_label_loss_only(mlp64, batch64):
    """The loss on the labels is the criterion on the kept samples; the meta step still sees the whole batch."""
    x, y = batch64
    mask = torch.arange(len(y)) % 3 != 0
    twin_model = copy.deepcopy(mlp64)
    wrapper, twin = make_wrapper(mlp64, meta_weight=0.5), make_wrapper(twin_model, meta_weight=0.5)
    stats = wrapper.step(x, y, label_mask=mask)
    assert stats["ce_loss"] == pytest.approx(F.cross_entropy(twin_model(x)[mask], y[mask]).item(), rel=1e-12)
    # the same update by hand: meta gradient on the whole batch, cross-entropy on the kept samples
    twin.meta_backward(x, y, twin_model(x))
    F.cross_entropy(twin_model(x)[mask], y[mask]).backward()
    twin.optimizer.step()
    helpers.assert_states_close((mlp64, twin_model), rtol=1e-10, atol=1e-12)


def test_a_batch_with_no_kept_label_trains_on_the_meta_loss_alone(mlp64, batch64):
    x, y = batch64
    wrapper = make_wrapper(mlp64, meta_weight=0.5)
    before = helpers.state(mlp64)
    stats = wrapper.step(x, y, label_mask=torch.zeros(len(y), dtype=torch.bool))
    assert stats["ce_loss"] == 0.0 and stats["meta_loss"] > 0 and stats["skipped"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in helpers.state(mlp64).items())


def test_a_bad_label_mask_is_refused(mlp64, batch64):
    x, y = batch64
    wrapper = make_wrapper(mlp64)
    with pytest.raises(TypeError, match="label_mask must be a bool tensor"):
        wrapper.step(x, y, label_mask=torch.ones(len(y)))
    with pytest.raises(ValueError, match="label_mask must have the targets' shape"):
        wrapper.step(x, y, label_mask=torch.ones(len(y) + 1, dtype=torch.bool))
    assert wrapper.num_updates == 0


def test_a_step_that_overshoots_its_target_is_not_trained_on():
    """The realised divergence, measured on the step the meta loss would use, beyond MAX_OVERSHOOT x the target."""
    from noisy_meta.fast_weights import MAX_OVERSHOOT, FastStepSize, _InnerGradients

    params = [torch.ones(3, dtype=torch.float64)]
    grads = _InnerGradients(["w"], params, [torch.ones(3, dtype=torch.float64)], batched=False)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    sizer = FastStepSize(target=0.01)
    near = logits + torch.tensor([[-0.1, 0.1], [0.1, -0.1]], dtype=torch.float64)
    assert sizer.observe(logits, near, grads, {"w": params[0] * 1.01}) and sizer.num_clipped == 0
    far = logits.flip(1)
    assert float(prediction_divergence(logits, far)) > MAX_OVERSHOOT * 0.01
    assert not sizer.observe(logits, far, grads, {"w": params[0] * 1.01}) and sizer.num_clipped == 1
    assert FastStepSize().observe(logits, far, grads, {"w": params[0]})  # no target: recorded, never refused
