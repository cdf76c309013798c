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


def reference_meta_objective(
    params, x, label_sets, mentor_log_probs, alpha, first_order, fast_mask=None, forward=mlp_forward
):
    """J(theta) = mean_m KL(mentor || f(x; theta - alpha * grad CE(f(x; theta), y_m))), written out."""
    fast_mask = fast_mask or [True] * len(params)
    total = 0.0
    for labels in label_sets:
        log_probs = F.log_softmax(forward(params, x), dim=1)
        inner = -log_probs[torch.arange(len(labels)), labels].mean()
        grads = torch.autograd.grad(inner, params, create_graph=not first_order)
        if first_order:
            grads = [g.detach() for g in grads]
        fast = [p - alpha * g if is_fast else p for p, g, is_fast in zip(params, grads, fast_mask)]
        student = F.log_softmax(forward(fast, x), dim=1)
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


# ---------------------------------------------------------------------- the scale-free inner steps

RADIUS = 0.05


def sgd_step(params, grads):
    return [p - ALPHA * g for p, g in zip(params, grads)]


def normalized_step(params, grads):
    """theta - r * g / ||g||, one norm over every fast tensor (written out, norms differentiated)."""
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [p - RADIUS * g / norm for p, g in zip(params, grads)]


def relative_step(params, grads):
    """Each tensor: theta_t - r * ||theta_t|| * g_t / ||g_t|| (written out, norms differentiated)."""
    return [p - RADIUS * torch.sqrt((p**2).sum()) * g / torch.sqrt((g**2).sum()) for p, g in zip(params, grads)]


def global_relative_step(params, grads):
    """theta - r * ||theta|| * g / ||g||, both norms over every fast tensor (written out, differentiated)."""
    norm_p = torch.sqrt(sum((p**2).sum() for p in params))
    norm_g = torch.sqrt(sum((g**2).sum() for g in grads))
    return [p - RADIUS * norm_p * g / norm_g for p, g in zip(params, grads)]


def adaptive_step(params, grads):
    """ASAM: theta - r * T^2 g / ||T g||, T = |theta| + 0.01 on weight matrices (held constant), 1 on biases."""
    scales = [p.detach().abs() + 0.01 if p.dim() > 1 else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
    return [p - RADIUS * t**2 * g / norm for p, t, g in zip(params, scales, grads)]


STEPS = {"sgd": sgd_step, "normalized": normalized_step, "relative": relative_step}
STEPS["global_relative"] = global_relative_step
STEPS["adaptive"] = adaptive_step


def reference_with_step(params, x, label_sets, mentor_log_probs, step, first_order, fast_mask):
    """J(theta) = mean_m KL(mentor || f(x; step(theta, grad CE_m))) with the step applied to the fast tensors."""
    total = 0.0
    for labels in label_sets:
        log_probs = F.log_softmax(mlp_forward(params, x), dim=1)
        inner = -log_probs[torch.arange(len(labels)), labels].mean()
        grads = torch.autograd.grad(inner, params, create_graph=not first_order)
        fast_params = [p for p, is_fast in zip(params, fast_mask) if is_fast]
        fast_grads = [g for g, is_fast in zip(grads, fast_mask) if is_fast]
        stepped = step(fast_params, fast_grads)
        if first_order:  # the whole step held constant: d theta' / d theta = I
            stepped = [p + (s - p).detach() for p, s in zip(fast_params, stepped)]
        stepped = iter(stepped)
        fast = [next(stepped) if is_fast else p for p, is_fast in zip(params, fast_mask)]
        student = F.log_softmax(mlp_forward(fast, x), dim=1)
        total = total + (mentor_log_probs.exp() * (mentor_log_probs - student)).sum(dim=1).mean()
    return total / len(label_sets)


@pytest.mark.parametrize("kind", ["normalized", "relative", "global_relative", "adaptive"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("sets_per_pass", [1, 3])
@pytest.mark.parametrize("fast_params", ["all", ["fc2.*"]])
def test_scale_free_steps_equal_reference_gradient(mlp64, batch64, kind, first_order, sets_per_pass, fast_params):
    x, y = batch64
    wrapper = make_wrapper(
        mlp64,
        first_order=first_order,
        sets_per_pass=sets_per_pass,
        inner_step=kind,
        inner_radius=RADIUS,
        fast_params=fast_params,
    )
    perturb_mentor(wrapper)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)
    mask = [True] * 4 if fast_params == "all" else [False, False, True, True]
    params = mlp_params(mlp64)
    reference = reference_with_step(params, x, labels, mentor_log_probs, STEPS[kind], first_order, mask)
    expected = torch.autograd.grad(reference, params)

    stats = wrapper.meta_backward(x, y, mlp64(x))
    assert stats["meta_loss"] == pytest.approx(reference.item(), rel=1e-10)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12)


def test_reference_sgd_step_is_the_original_reference(mlp64, batch64):
    """The step-generic reference with SGD's step is the paper's objective (so it checks the others fairly)."""
    x, y = batch64
    wrapper = make_wrapper(mlp64)
    perturb_mentor(wrapper)
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)
    params = mlp_params(mlp64)
    generic = reference_with_step(params, x, labels, mentor_log_probs, sgd_step, False, [True] * 4)
    original = reference_meta_objective(params, x, labels, mentor_log_probs, ALPHA, False)
    assert generic.item() == pytest.approx(original.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["normalized", "relative", "global_relative"])
def test_scale_free_step_has_the_size_it_promises(mlp64, batch64, kind):
    """normalized: ||theta' - theta|| = r; relative: every tensor moves by r * ||theta_t||; global_relative:
    all together move by r * ||theta||, shared as the gradient is; whatever ||g||."""
    from noisy_meta.fast_weights import InnerStep

    x, y = batch64
    params = mlp_params(mlp64)
    grads = torch.autograd.grad(F.cross_entropy(mlp64(x), y), params)
    for factor in (1e-3, 1.0, 1e3):  # the gradient's size must not matter
        stepped = InnerStep(kind, RADIUS)(params, [factor * g for g in grads], batched=False)
        moves = [float((s - p).detach().norm()) for s, p in zip(stepped, params)]
        total = sum(m**2 for m in moves) ** 0.5
        norm = float(torch.sqrt(sum((p.detach() ** 2).sum() for p in params)))
        if kind == "normalized":
            assert total == pytest.approx(RADIUS, rel=1e-9)
        elif kind == "global_relative":
            assert total == pytest.approx(RADIUS * norm, rel=1e-9)
            shares = [float(g.norm()) for g in grads]
            assert moves[0] / moves[2] == pytest.approx(shares[0] / shares[2], rel=1e-9)
        else:
            for move, p in zip(moves, params):
                assert move == pytest.approx(RADIUS * float(p.detach().norm()), rel=1e-9)
        assert InnerStep(kind, RADIUS).displacement(params, [factor * g for g in grads]) == pytest.approx(
            RADIUS / norm if kind == "normalized" else RADIUS, rel=1e-9
        )


def test_scale_free_step_is_finite_for_a_zero_gradient_and_a_zero_tensor():
    from noisy_meta.fast_weights import InnerStep

    params = [torch.zeros(3, dtype=torch.float64, requires_grad=True), torch.ones(2, dtype=torch.float64)]
    grads = [torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    for kind in ("normalized", "relative", "global_relative"):
        stepped = InnerStep(kind, RADIUS)(params, grads, batched=False)
        assert all(torch.isfinite(s).all() for s in stepped)
        assert torch.equal(stepped[1], params[1])  # no gradient: no move
    relative = InnerStep("relative", RADIUS)(params, grads, batched=False)
    assert relative[0].abs().max() < 1e-12  # a zero tensor (a fresh bias) stays (its norm is floored at 1e-12)
    (sum(s.sum() for s in relative)).backward()
    assert torch.isfinite(params[0].grad).all()
