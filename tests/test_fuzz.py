"""Property-based tests: any configuration and batch either trains or is refused with a clear error.

Never an IndexError or a RuntimeError from deep inside, never a hang (hypothesis' deadline),
never a non-finite parameter after an update that was reported as applied.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TinyMLP, tiny_resnet

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper  # noqa: E402

FUZZ = settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def cases(draw):
    num_classes = draw(st.integers(1, 6))
    batch_size = draw(st.integers(1, 20))
    pattern = draw(st.sampled_from(["random", "one class", "all distinct"]))
    if pattern == "random":
        labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=batch_size, max_size=batch_size))
    elif pattern == "one class":
        labels = [draw(st.integers(0, num_classes - 1))] * batch_size
    else:
        batch_size = min(batch_size, num_classes)
        labels = list(range(batch_size))
    return {
        "num_classes": num_classes,
        "labels": labels,
        "label_dtype": draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "model": draw(st.sampled_from(["mlp", "resnet"])),
        "config": {
            "num_synthetic": draw(st.integers(0, 4)),
            "perturb_ratio": draw(st.floats(0.01, 1.0)),
            "num_neighbors": draw(st.integers(1, 12)),
            "first_order": draw(st.booleans()),
            "update_rule": draw(st.sampled_from(["joint", "sequential"])),
            "fast_params": draw(st.sampled_from(["all", "head"])),
            "sets_per_pass": draw(st.integers(1, 3)),
            "ramp_start": 0,
            "ramp_end": 0,
            "seed": 0,
        },
    }


def build(case):
    torch.manual_seed(0)
    if case["model"] == "mlp":
        model = TinyMLP(in_features=4, num_classes=case["num_classes"]).to(case["dtype"])
        config = dict(case["config"], fast_params="all")  # "head" needs a timm model
        inputs = torch.randn(len(case["labels"]), 4, dtype=case["dtype"])
    else:
        model = tiny_resnet(num_classes=case["num_classes"]).to(case["dtype"])
        config = case["config"]
        inputs = torch.randn(len(case["labels"]), 3, 8, 8, dtype=case["dtype"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    targets = torch.tensor(case["labels"], dtype=case["label_dtype"])
    return MetaNoiseWrapper(model, optimizer, **config), inputs, targets


@FUZZ
@given(cases())
def test_step_trains_or_refuses_clearly(case):
    wrapper, inputs, targets = build(case)
    config = wrapper.config
    before = {name: p.detach().clone() for name, p in wrapper.module.named_parameters()}
    too_small = config.num_synthetic > 0 and len(targets) <= config.num_neighbors
    batch_norm_single = case["model"] == "resnet" and len(targets) == 1
    try:
        stats = wrapper.step(inputs, targets)
    except ValueError as error:
        message = str(error)
        assert too_small or batch_norm_single, f"unexpected refusal: {message}"
        if too_small:
            assert f"num_neighbors={config.num_neighbors}" in message
        else:
            assert "more than 1 value per channel" in message
        for name, p in wrapper.module.named_parameters():  # nothing changed
            assert torch.equal(p, before[name]), name
        return
    assert not too_small and not batch_norm_single, "a batch that cannot work was accepted"
    assert all(math.isfinite(stats[key]) for key in ("loss", "ce_loss", "meta_loss", "labels_changed"))
    if not stats["skipped"]:
        assert all(torch.isfinite(p).all() for p in wrapper.module.parameters())


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "num_synthetic": st.one_of(st.integers(-3, 12), st.floats(-1, 3), st.none()),
            "perturb_ratio": st.one_of(st.floats(-1, 2), st.just(float("nan")), st.integers(-1, 2)),
            "num_neighbors": st.one_of(st.integers(-2, 12), st.booleans()),
            "inner_lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)),
            "meta_every": st.integers(-1, 5),
        }
    )
)
def test_config_is_valid_or_a_value_error(values):
    try:
        config = MetaNoiseConfig(**values)
    except ValueError as error:
        assert str(error).startswith("invalid MetaNoiseConfig: ")
        return
    assert isinstance(config.num_synthetic, int) and config.num_synthetic >= 0
    assert 0 < config.perturb_ratio <= 1 and config.num_neighbors >= 1 and config.meta_every >= 1
    assert math.isfinite(config.inner_lr) and config.inner_lr > 0


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_train_exactly_like_int64(label_dtype):
    """Found by the fuzzer: int32 labels used to crash inside cross_entropy."""
    case = {
        "num_classes": 4,
        "labels": [0, 1, 2, 3] * 3,
        "dtype": torch.float64,
        "model": "mlp",
        "config": {"num_synthetic": 2, "num_neighbors": 3, "ramp_start": 0, "ramp_end": 0, "seed": 0},
    }
    narrow, inputs, targets = build({**case, "label_dtype": label_dtype})
    wide, _, wide_targets = build({**case, "label_dtype": torch.int64})
    assert narrow.step(inputs, targets) == wide.step(inputs, wide_targets)
    for a, b in zip(narrow.module.parameters(), wide.module.parameters()):
        assert torch.equal(a, b)
