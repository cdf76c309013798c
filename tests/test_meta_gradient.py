"""The meta-gradient and the update rules against explicit reference computations (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from noisy_meta import nearest_neighbors, neighbor_label_transfer

import helpers

ALPHA = 0.3
M = 4


def mlp_forward(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def reference_meta_objective(params, x, label_sets, mentor_log_probs, alpha, first_order, fast_mask=None):
    """J(theta) = mean_m KL(mentor || f(x; theta - alpha * grad CE(f(x; theta), y_m))), written out."""
    fast_mask = fast_mask or [True] * len(params)
    total = 0.0
    for labels in label_sets:
        log_probs = F.log_softmax(mlp_forward(params, x), dim=1)
        inner = -log_probs[torch.arange(len(labels)), labels].mean()
        grads = torch.autograd.grad(inner, params, create_graph=not first_order)
        if first_order:
            grads = [g.detach() for g in grads]
        fast = [p - alpha * g if is_fast else p for p, g, is_fast in zip(params, grads, fast_mask)]
        student = F.log_softmax(mlp_forward(fast, x), dim=1)
        kl = (mentor_log_probs.exp() * (mentor_log_probs - student)).sum(dim=1).mean()
        total = total + kl
    return total / len(label_sets)


def mlp_params(model):
    return [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]


def expected_synthetic(wrapper, inputs, targets, seed):
    """What the wrapper documents: mentor features, k-NN, labels from a generator seeded with `seed`."""
    with torch.no_grad():
        mentor_logits = wrapper.mentor(inputs)
    neighbors = nearest_neighbors(mentor_logits, wrapper.config.num_neighbors)
    generator = torch.Generator().manual_seed(seed)
    cfg = wrapper.config
    labels = neighbor_label_transfer(targets, neighbors, cfg.num_synthetic, cfg.perturb_ratio, generator).labels
    return labels, F.log_softmax(mentor_logits, dim=1)


def make_wrapper(model, first_order=False, **overrides):
    settings = dict(num_synthetic=M, num_neighbors=3, inner_lr=ALPHA, seed=11, first_order=first_order)
    return helpers.make_wrapper(model, lr=0.1, momentum=0.0, **{**settings, **overrides})


def perturb_mentor(wrapper):
    """A mentor that differs from the student, so the meta-gradient is not trivially small."""
    with torch.no_grad():
        for p in wrapper.mentor.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("sets_per_pass", [1, 3, M])  # one at a time; a pass of 3 then 1; all at once
def test_meta_backward_equals_reference_gradient(mlp64, batch64, first_order, sets_per_pass):
    x, y = batch64
    wrapper = make_wrapper(mlp64, first_order=first_order, sets_per_pass=sets_per_pass)
    perturb_mentor(wrapper)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)

    reference = reference_meta_objective(mlp_params(mlp64), x, labels, mentor_log_probs, ALPHA, first_order)
    expected = torch.autograd.grad(reference, mlp_params(mlp64))

    stats = wrapper.meta_backward(x, y, mlp64(x))
    assert stats["meta_loss"] == pytest.approx(reference.item(), rel=1e-10)
    for p, g in zip(mlp_params(mlp64), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


def test_second_order_differs_from_first_order(mlp64, batch64):
    x, y = batch64
    grads = {}
    for first_order in (False, True):
        model = copy.deepcopy(mlp64)
        wrapper = make_wrapper(model, first_order=first_order)
        torch.manual_seed(5)
        perturb_mentor(wrapper)
        wrapper.meta_backward(x, y, model(x))
        grads[first_order] = model.fc1.weight.grad
    assert not torch.allclose(grads[False], grads[True], rtol=1e-3)


def test_second_order_meta_gradient_matches_finite_differences(mlp64, batch64):
    x, y = batch64
    wrapper = make_wrapper(mlp64)
    perturb_mentor(wrapper)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)
    wrapper.meta_backward(x, y, mlp64(x))

    params = mlp_params(mlp64)
    eps = 1e-6
    coordinates = [(0, (0, 0)), (0, (3, 2)), (1, (1,)), (2, (2, 4)), (3, (0,)), (3, (2,))]
    for index, position in coordinates:
        values = []
        for sign in (1, -1):
            shifted = [p.detach().clone().requires_grad_(True) for p in params]
            with torch.no_grad():
                shifted[index][position] += sign * eps
            values.append(reference_meta_objective(shifted, x, labels, mentor_log_probs, ALPHA, False).item())
        numeric = (values[0] - values[1]) / (2 * eps)
        assert params[index].grad[position].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("sets_per_pass", [1, M])
def test_fast_param_subset_matches_reference(mlp64, batch64, sets_per_pass):
    x, y = batch64
    wrapper = make_wrapper(mlp64, fast_params=["fc2.*"], sets_per_pass=sets_per_pass)
    perturb_mentor(wrapper)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)
    reference = reference_meta_objective(
        mlp_params(mlp64), x, labels, mentor_log_probs, ALPHA, False, fast_mask=[False, False, True, True]
    )
    expected = torch.autograd.grad(reference, mlp_params(mlp64))
    wrapper.meta_backward(x, y, mlp64(x))
    for p, g in zip(mlp_params(mlp64), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("sets_per_pass", [1, 3])
def test_per_set_accumulation_equals_summed_loss_gradient(mlp64, batch64, first_order, sets_per_pass):
    x, y = batch64
    grads = []
    for accumulate in (True, False):
        model = copy.deepcopy(mlp64)
        wrapper = make_wrapper(model, first_order=first_order, sets_per_pass=sets_per_pass)
        torch.manual_seed(5)
        perturb_mentor(wrapper)
        outputs = model(x)
        if accumulate:
            wrapper.meta_backward(x, y, outputs)
        else:
            wrapper.meta_loss(x, y, outputs).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_joint_update_is_one_step_on_ce_plus_weighted_meta(mlp64, batch64):
    x, y = batch64
    weight = 0.7
    initial = [p.detach().clone() for p in mlp_params(mlp64)]
    wrapper = make_wrapper(mlp64, meta_weight=weight)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)

    params = [p.clone().requires_grad_(True) for p in initial]
    ce = F.cross_entropy(mlp_forward(params, x), y)
    meta = reference_meta_objective(params, x, labels, mentor_log_probs, ALPHA, False)
    grads = torch.autograd.grad(ce + weight * meta, params)

    stats = wrapper.step(x, y)
    assert stats["meta_weight"] == weight and stats["skipped"] == 0.0
    assert stats["loss"] == pytest.approx(ce.item() + weight * meta.item(), rel=1e-10)
    for p, p0, g in zip(mlp_params(mlp64), initial, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-10, atol=1e-12)


def test_sequential_update_is_meta_step_then_conventional_step(mlp64, batch64):
    x, y = batch64
    weight = 0.7
    initial = [p.detach().clone() for p in mlp_params(mlp64)]
    wrapper = make_wrapper(mlp64, meta_weight=weight, update_rule="sequential")
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)

    params = [p.clone().requires_grad_(True) for p in initial]
    meta = reference_meta_objective(params, x, labels, mentor_log_probs, ALPHA, False)
    halfway = [
        (p - 0.1 * weight * g).detach().requires_grad_(True) for p, g in zip(params, torch.autograd.grad(meta, params))
    ]
    ce = F.cross_entropy(mlp_forward(halfway, x), y)
    final = [p - 0.1 * g for p, g in zip(halfway, torch.autograd.grad(ce, halfway))]

    stats = wrapper.step(x, y)
    assert stats["ce_loss"] == pytest.approx(ce.item(), rel=1e-10)
    for p, expected in zip(mlp_params(mlp64), final):
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
