"""The losses on the given labels against hand computations, and the one criterion the wrapper and the task share."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
from noisy_meta.losses import (
    CrossEntropy,
    GeneralizedCrossEntropy,
    SymmetricCrossEntropy,
    make_criterion,
    resolve_criterion,
)

import helpers

#: Two samples, three classes; softmax of row 0 is (0.2, 0.3, 0.5) exactly.
LOGITS = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64))
TARGETS = torch.tensor([2, 1])
P_Y = (0.5, 0.3)  # the probability of each given label


def test_cross_entropy_by_hand():
    assert float(CrossEntropy()(LOGITS, TARGETS)) == pytest.approx(-(math.log(0.5) + math.log(0.3)) / 2, rel=1e-12)


def test_label_smoothing_by_hand():
    """Target 1 - s on the label plus s / C on every class (timm's and PyTorch's convention)."""
    s, probs = 0.1, [(0.2, 0.3, 0.5), (0.6, 0.3, 0.1)]
    expected = 0.0
    for row, label in zip(probs, (2, 1)):
        target = [s / 3 + (1 - s) * (k == label) for k in range(3)]
        expected -= sum(t * math.log(p) for t, p in zip(target, row))
    assert float(CrossEntropy(s)(LOGITS, TARGETS)) == pytest.approx(expected / 2, rel=1e-12)


def test_gce_by_hand():
    q = 0.7
    expected = sum((1 - p**q) / q for p in P_Y) / 2
    assert float(GeneralizedCrossEntropy(q)(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-12)


def test_gce_at_q_one_is_the_mean_absolute_error():
    assert float(GeneralizedCrossEntropy(1.0)(LOGITS, TARGETS)) == pytest.approx(sum(1 - p for p in P_Y) / 2)


def test_sce_by_hand():
    """alpha * CE + beta * RCE, RCE = -sum_k p_k log q_k with log 0 = A (= -4): -A * (1 - p_y)."""
    alpha, beta, a = 0.1, 1.0, -4.0
    expected = sum(alpha * -math.log(p) + beta * -a * (1 - p) for p in P_Y) / 2
    assert float(SymmetricCrossEntropy(alpha, beta)(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-12)


def test_half_precision_logits_give_a_float32_loss():
    for loss in (CrossEntropy(0.1), GeneralizedCrossEntropy(), SymmetricCrossEntropy()):
        assert loss(LOGITS.to(torch.bfloat16), TARGETS).dtype == torch.float32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CrossEntropy(1.0), "smoothing must be in"),
        (lambda: GeneralizedCrossEntropy(0.0), "q must be in"),
        (lambda: SymmetricCrossEntropy(-1.0, 1.0), "alpha must be >= 0"),
        (lambda: SymmetricCrossEntropy(0.0, 0.0), "must not both be 0"),
        (lambda: make_criterion("gce", smoothing=0.1), "smoothing applies to cross_entropy only"),
        (lambda: make_criterion("focal"), "loss must be one of"),
        (lambda: MetaNoiseConfig(criterion="focal"), "criterion must be one of"),
        (lambda: MetaNoiseConfig(criterion=3), "criterion must be one of"),
    ],
)
def test_bad_losses_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_names_and_callables_resolve():
    assert resolve_criterion("gce") == GeneralizedCrossEntropy(0.7)
    assert resolve_criterion("label_smoothing") == CrossEntropy(0.1)
    assert make_criterion("cross_entropy", smoothing=0.2) == CrossEntropy(0.2)
    assert resolve_criterion(F.cross_entropy) is F.cross_entropy


@pytest.mark.parametrize("criterion", ["gce", SymmetricCrossEntropy(0.5, 0.5), "timm"])
def test_the_wrapper_trains_on_the_criterion(mlp64, batch64, criterion):
    """With the meta step off, one wrapper step is one optimizer step on the criterion's gradient."""
    if criterion == "timm":
        from timm.loss import LabelSmoothingCrossEntropy

        criterion = LabelSmoothingCrossEntropy(0.1)
    x, y = batch64
    initial = [p.detach().clone() for p in mlp64.parameters()]
    loss = resolve_criterion(criterion)
    params = [p.clone().requires_grad_(True) for p in initial]
    expected_loss = loss(torch.func.functional_call(mlp64, dict(zip(dict(mlp64.named_parameters()), params)), x), y)
    grads = torch.autograd.grad(expected_loss, params)

    wrapper = helpers.make_wrapper(mlp64, lr=0.1, momentum=0.0, criterion=criterion, meta_weight=0.0)
    stats = wrapper.step(x, y)
    assert stats["ce_loss"] == pytest.approx(float(expected_loss.detach()), rel=1e-10)
    for p, p0, g in zip(mlp64.parameters(), initial, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-10, atol=1e-12)


def test_the_task_and_the_wrapper_share_the_criterion():
    pytest.importorskip("timm.task")
    from noisy_meta.timm import MetaNoiseTask

    model = helpers.tiny_resnet()
    config = MetaNoiseConfig(criterion="gce")
    assert MetaNoiseTask(model, config=config, verbose=False).criterion == GeneralizedCrossEntropy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert MetaNoiseWrapper(model, optimizer, config).core.criterion == GeneralizedCrossEntropy()
    task = MetaNoiseTask(model, CrossEntropy(0.2), config=config, verbose=False)  # the argument wins
    assert task.criterion == CrossEntropy(0.2) and task.config.criterion == CrossEntropy(0.2)
