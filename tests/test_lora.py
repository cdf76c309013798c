"""A PEFT (LoRA) model in the wrapper: the adapters and the head are the fast weights, the mentor holds the frozen
trunk once, and the first update equals a hand-written LoRA reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_meta_gradient import ALPHA, expected_synthetic, make_wrapper, reference_meta_objective

import helpers

peft = pytest.importorskip("peft")

RANK, LORA_ALPHA = 2, 3.0


def lora_mlp(model: helpers.TinyMLP):
    """``model`` with LoRA on ``fc1`` (random ``B``, so the adapters' gradients are not zero) and ``fc2`` trained."""
    config = peft.LoraConfig(
        r=RANK, lora_alpha=LORA_ALPHA, target_modules=["fc1"], modules_to_save=["fc2"], init_lora_weights=False
    )
    return peft.get_peft_model(model, config)


def lora_forward(frozen):
    """The LoRA MLP written out: ``fc2(tanh(x (W1 + alpha/r B A)^T + b1))`` with ``W1``, ``b1`` frozen."""
    w1, b1 = frozen

    def forward(params, x):
        a, b, w2, b2 = params
        return torch.tanh(x @ (w1 + (LORA_ALPHA / RANK) * b @ a).T + b1) @ w2.T + b2

    return forward


def trainable(model):
    """The trainable tensors in the reference's order: ``A``, ``B``, the trained copy of ``fc2``."""
    named = dict(model.named_parameters())
    prefix = "base_model.model."
    return [
        named[prefix + "fc1.lora_A.default.weight"],
        named[prefix + "fc1.lora_B.default.weight"],
        named[prefix + "fc2.modules_to_save.default.weight"],
        named[prefix + "fc2.modules_to_save.default.bias"],
    ]


def test_first_update_equals_a_hand_written_lora_reference(mlp64, batch64):
    x, y = batch64
    model = lora_mlp(mlp64)
    frozen = [mlp64.fc1.base_layer.weight, mlp64.fc1.base_layer.bias]
    initial = [p.detach().clone() for p in trainable(model)]
    weight = 0.7
    wrapper = make_wrapper(model, meta_weight=weight)
    assert set(wrapper.fast_param_names) == {name for name, p in model.named_parameters() if p.requires_grad}
    labels, mentor_log_probs = expected_synthetic(wrapper, x, y, seed=11)

    forward = lora_forward(frozen)
    params = [p.clone().requires_grad_(True) for p in initial]
    ce = F.cross_entropy(forward(params, x), y)
    meta = reference_meta_objective(params, x, labels, mentor_log_probs, ALPHA, False, forward=forward)
    grads = torch.autograd.grad(ce + weight * meta, params)

    stats = wrapper.step(x, y)
    assert stats["loss"] == pytest.approx(ce.item() + weight * meta.item(), rel=1e-10)
    for p, p0, g in zip(trainable(model), initial, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in frozen)


def test_the_mentor_shares_the_frozen_trunk_and_averages_the_adapters(mlp64, batch64):
    x, y = batch64
    model = lora_mlp(mlp64)
    wrapper = make_wrapper(model, mentor_decay_ramp=0.5, mentor_decay=0.5, mentor_warmup=False)
    students = {name: p for name, p in model.named_parameters()}
    mentors = dict(wrapper.mentor.named_parameters())
    for name, p in students.items():  # held once: the same tensors, not copies
        assert (mentors[name] is p) == (not p.requires_grad)
    expected = {name: mentors[name].detach().clone() for name, p in students.items() if p.requires_grad}
    for _ in range(3):
        wrapper.step(x, y)
        for name in expected:  # the EMA with decay 0.5, written out
            expected[name] = 0.5 * expected[name] + 0.5 * students[name].detach()
    for name, value in expected.items():
        torch.testing.assert_close(mentors[name], value, rtol=1e-12, atol=1e-14)
    assert not torch.equal(mentors[next(iter(expected))], students[next(iter(expected))])


def test_unfreezing_after_wrapping_is_refused_by_name(mlp64, batch64):
    model = lora_mlp(mlp64)
    wrapper = make_wrapper(model)
    before = copy.deepcopy(wrapper.mentor.state_dict())
    mlp64.fc1.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="build a new wrapper after unfreezing"):
        wrapper.step(*batch64)
    for name, value in wrapper.mentor.state_dict().items():
        assert torch.equal(value, before[name])


def test_resume_continues_bitwise(mlp64, batch64):
    x, y = batch64
    reference = make_wrapper(lora_mlp(copy.deepcopy(mlp64)))
    resumed_model = lora_mlp(copy.deepcopy(mlp64))
    for _ in range(2):
        reference.step(x, y)
    state = copy.deepcopy({"model": reference.model.state_dict(), "wrapper": reference.state_dict()})
    resumed_model.load_state_dict(state["model"])
    resumed = make_wrapper(resumed_model)
    resumed.load_state_dict(state["wrapper"])
    for _ in range(2):
        a, b = reference.step(x, y), resumed.step(x, y)
        assert a["loss"] == b["loss"]
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    for name, value in reference.mentor.state_dict().items():
        assert torch.equal(value, resumed.mentor.state_dict()[name]), name


# ------------------------------------------------------------------ the command line: --lora-rank


@pytest.mark.slow
def test_a_lora_run_saves_timm_weights_exports_and_resumes_bitwise(tiny_mnist, tmp_path):
    """--lora-rank: student/mentor files are plain timm state dicts (the adapters merged), the export loads in timm
    offline, and a run killed mid-epoch resumes bitwise equal to one never interrupted (adapters, mentor, optimizer)."""
    import signal

    import timm
    from safetensors.torch import load_file
    from test_preemption import assert_same_run, mid_epoch_update, run, succeeded

    from noisy_meta.finetune.export import best_record

    from finetune_helpers import metrics

    lora = ["--lora-rank", "4", "--lora-alpha", "8"]
    reference = tmp_path / "reference"
    succeeded(run(tiny_mnist, reference, *lora, "--export-dir", str(reference / "export")))
    plain = timm.create_model("test_resnet", num_classes=10)
    for name in ("student.safetensors", "mentor.safetensors"):
        saved = load_file(str(reference / "best" / name))
        assert saved.keys() == plain.state_dict().keys()
    exported = timm.create_model(f"local-dir:{reference / 'export'}", pretrained=True).state_dict()
    kept = load_file(str(reference / "best" / f"{best_record(metrics(reference))[1]}.safetensors"))
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], v) for k, v in kept.items())

    output = tmp_path / "killed"
    result = run(tiny_mnist, output, *lora, signal_at=f"{mid_epoch_update(1)}:KILL")
    assert result.returncode == -signal.SIGKILL
    succeeded(run(tiny_mnist, output, *lora, "--resume"))
    assert_same_run(output, reference)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-rank", "4", "--freeze-backbone"], "give one"),
        (["--lora-alpha", "8"], "give --lora-rank too"),
        (["--lora-rank", "4", "--iterations", "2"], "run one iteration"),
    ],
)
def test_lora_flag_errors(flags, message):
    import subprocess
    import sys

    from finetune_helpers import EXAMPLE

    result = subprocess.run([sys.executable, str(EXAMPLE), *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
