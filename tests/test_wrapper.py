"""Invariants of a whole iteration: BatchNorm buffers, determinism, mentor, schedules, own loops, state.

Where the fast weights act: test_fast_scopes.py; the consistency-only and batched variants: test_meta_variants.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper

from helpers import TinyMLP, buffers, image_batch, make_wrapper, tiny_resnet


def resnet_batch(batch_size: int = 12, seed: int = 0):
    return image_batch(seed, batch_size)


@pytest.mark.parametrize("feature_source", ["mentor", "student"])
@pytest.mark.parametrize("update_rule", ["joint", "sequential"])
def test_batchnorm_buffers_move_exactly_as_in_plain_training(feature_source, update_rule):
    torch.manual_seed(0)
    model = tiny_resnet()
    plain = copy.deepcopy(model)
    x, y = resnet_batch()
    wrapper = make_wrapper(model, feature_source=feature_source, update_rule=update_rule)
    wrapper.step(x, y)
    with torch.no_grad():
        plain(x)  # one plain training-mode forward
    expected = buffers(plain)
    assert expected["bn1.num_batches_tracked"].item() == 1
    for name, value in buffers(model).items():
        if update_rule == "joint" or name.endswith("num_batches_tracked"):
            assert torch.equal(value, expected[name]), name
        # sequential: the one real forward runs after the meta update, at other weights


def test_meta_backward_leaves_buffers_untouched():
    torch.manual_seed(0)
    model = tiny_resnet()
    x, y = resnet_batch()
    wrapper = make_wrapper(model, feature_source="student")
    outputs = model(x)
    before = buffers(model)
    wrapper.meta_backward(x, y, outputs)
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("first_order", [False, True])
def test_two_runs_with_the_same_seed_are_bitwise_identical(first_order):
    def run():
        torch.manual_seed(3)
        model = tiny_resnet()
        wrapper = make_wrapper(model, first_order=first_order, seed=5)
        for step in range(3):
            wrapper.step(*resnet_batch(seed=step))
        return [p.detach().clone() for p in model.parameters()], [p.clone() for p in wrapper.mentor.parameters()]

    (params_a, mentor_a), (params_b, mentor_b) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(torch.equal(a, b) for a, b in zip(mentor_a, mentor_b))


def test_seed_none_follows_torch_manual_seed():
    def labels_changed():
        torch.manual_seed(9)
        model = tiny_resnet()
        return make_wrapper(model, seed=None).step(*resnet_batch())["labels_changed"]

    assert labels_changed() == labels_changed()


def test_building_the_meta_step_draws_nothing_from_the_global_rng():
    """A framework that restores its RNG states on resume builds the wrapper after it: a draw would shift the run."""
    from noisy_meta import compat

    compat._replacements.cache_clear()  # the double-backward probe runs again
    torch.manual_seed(9)
    model = tiny_resnet()
    before = torch.get_rng_state()
    make_wrapper(model, seed=None, first_order=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_zero_meta_weight_is_plain_cross_entropy_training():
    torch.manual_seed(0)
    model = tiny_resnet()
    plain = copy.deepcopy(model)
    wrapper = make_wrapper(model, ramp_start=100, ramp_end=200)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x, y = resnet_batch(seed=step)
        stats = wrapper.step(x, y)
        assert stats["meta_weight"] == 0.0 and stats["meta_loss"] == 0.0
        optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_meta_weight_ramp_and_mentor_decay_schedule():
    config = MetaNoiseConfig(ramp_start=10, ramp_end=30, meta_weight=2.0)
    assert config.meta_weight_at(0) == 0.0 and config.meta_weight_at(9) == 0.0
    assert config.meta_weight_at(10) == pytest.approx(2.0 * math.exp(-5.0))
    assert config.meta_weight_at(20) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert config.meta_weight_at(30) == 2.0 and config.meta_weight_at(10**6) == 2.0
    unwarmed = config.with_overrides(mentor_warmup=False)
    assert unwarmed.mentor_decay_at(29) == 0.99 and unwarmed.mentor_decay_at(30) == 0.999
    assert MetaNoiseConfig(ramp_start=0, ramp_end=0).meta_weight_at(0) == 1.0


def test_the_mentor_decay_warms_up_as_timms_model_ema():
    """``mentor_warmup``: the decay of update t is min(scheduled, 1 - (1 + t)^(-2/3)), timm's
    ModelEmaV3(use_warmup=True) formula; a mentor passed in is averaged without it."""
    from timm.utils import ModelEmaV3

    config = MetaNoiseConfig(ramp_start=10, ramp_end=30)
    ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.999, use_warmup=True)
    for step in (0, 1, 29, 30, 500, 10**5):
        expected = min(0.99 if step < 30 else 0.999, 1.0 - (1.0 + step) ** (-2.0 / 3.0))
        assert config.mentor_decay_at(step) == pytest.approx(expected, abs=1e-12)
        if step >= 30:
            assert config.mentor_decay_at(step) == pytest.approx(
                ema.get_decay(step + 1), abs=1e-12
            )  # timm counts from 1
    assert config.mentor_decay_at(0) == 0.0 and config.mentor_decay_at(0, warmup=False) == 0.99
    model = TinyMLP()
    student = MetaNoiseWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    passed = MetaNoiseWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), config, mentor=TinyMLP())
    assert student.core.mentor.decay_at(0) == 0.0 and passed.core.mentor.decay_at(0) == 0.99
    with pytest.raises(ValueError, match="mentor_warmup must be a bool"):
        MetaNoiseConfig(mentor_warmup=1)


def test_mentor_is_an_ema_of_parameters_and_buffers():
    torch.manual_seed(0)
    model = tiny_resnet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    wrapper = make_wrapper(model, ramp_start=0, ramp_end=5, mentor_warmup=False)  # decay 0.99 during the ramp
    stats = wrapper.step(*resnet_batch())
    assert stats["mentor_decay"] == 0.99
    current = model.state_dict()
    for name, value in wrapper.mentor.state_dict().items():
        if value.is_floating_point():
            expected = 0.99 * initial[name] + 0.01 * current[name]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, current[name])
    assert not wrapper.mentor.training
    assert all(not p.requires_grad for p in wrapper.mentor.parameters())
    warmed = make_wrapper(tiny_resnet(), ramp_start=0, ramp_end=5)  # warm-up: decay 0 at the first update
    assert warmed.step(*resnet_batch())["mentor_decay"] == 0.0
    for name, value in warmed.mentor.state_dict().items():
        torch.testing.assert_close(value, warmed.module.state_dict()[name], rtol=0, atol=0)


def test_user_mentor_starts_from_given_weights_and_frozen_stays():
    torch.manual_seed(0)
    model, given = tiny_resnet(), tiny_resnet()
    given_state = {k: v.clone() for k, v in given.state_dict().items()}
    wrapper = make_wrapper(model, mentor_update="frozen", mentor=given)
    wrapper.step(*resnet_batch())
    for name, value in wrapper.mentor.state_dict().items():
        assert torch.equal(value, given_state[name])
    assert wrapper.mentor is not given

    ema = make_wrapper(tiny_resnet(), mentor=given)
    assert torch.equal(ema.mentor.fc.weight, given.fc.weight)
    ema.step(*resnet_batch())
    assert not torch.equal(ema.mentor.fc.weight, given.fc.weight)
    assert torch.equal(given.fc.weight, given_state["fc.weight"])  # the module passed in is never changed


def test_ema_mentor_with_another_architecture_is_refused():
    with pytest.raises(ValueError, match="mentor_update='frozen'"):
        make_wrapper(tiny_resnet(), mentor=tiny_resnet(num_classes=5))
    make_wrapper(tiny_resnet(), mentor=tiny_resnet(num_classes=4, in_chans=3), mentor_update="frozen")


def test_mentor_tracks_student_accuracy_in_eval_mode():
    """The pitfall of parameter-only EMA: a mentor with stale BatchNorm stats is near chance."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = images[:1400], labels[:1400], images[1400:], labels[1400:]
    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapper = MetaNoiseWrapper(
        model,
        optimizer,
        num_synthetic=1,
        first_order=True,
        ramp_start=20,
        ramp_end=60,
        seed=0,
        mentor_decay_ramp=0.9,
        mentor_decay=0.95,
    )
    for _ in range(3):
        order = torch.randperm(len(train_x))
        for start in range(0, len(order) - 31, 32):
            index = order[start : start + 32]
            wrapper.step(train_x[index], train_y[index])
    with torch.no_grad():
        model.eval()
        student = (model(test_x).argmax(1) == test_y).float().mean().item()
        mentor = (wrapper.mentor(test_x).argmax(1) == test_y).float().mean().item()
    # chance is 0.1; a mentor with stale BatchNorm statistics sits near it whatever the student learnt
    assert student > 0.6
    assert mentor > 0.6 and mentor > student - 0.1


def test_own_loop_matches_step():
    """meta_backward + your own CE backward + optimizer step + update_mentor == step()."""
    results = []
    for own_loop in (False, True):
        torch.manual_seed(0)
        model = tiny_resnet()
        wrapper = make_wrapper(model)
        optimizer = wrapper.optimizer
        for step in range(2):
            x, y = resnet_batch(seed=step)
            if own_loop:
                optimizer.zero_grad()
                with wrapper.forward_context():
                    outputs = model(x)
                    wrapper.meta_backward(x, y, outputs)
                    F.cross_entropy(outputs, y).backward()
                optimizer.step()
                wrapper.update_mentor()
            else:
                wrapper.step(x, y)
        results.append([p.detach().clone() for p in list(model.parameters()) + list(wrapper.mentor.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_model_trains_through_its_eager_module():
    torch.manual_seed(0)
    model = tiny_resnet()
    compiled = torch.compile(model)
    wrapper = make_wrapper(compiled)
    assert wrapper.module is model
    before = model.fc.weight.detach().clone()
    stats = wrapper.step(*resnet_batch())
    assert stats["skipped"] == 0.0 and not torch.equal(before, model.fc.weight)


def test_feature_source_callable_and_frozen_module():
    torch.manual_seed(0)
    x, y = resnet_batch()
    seen = []

    def features(inputs):
        seen.append(inputs.shape[0])
        return inputs.flatten(1)

    make_wrapper(tiny_resnet(), feature_source=features).step(x, y)
    assert seen == [12]
    make_wrapper(tiny_resnet(), feature_source=tiny_resnet(num_classes=7)).step(x, y)


def test_state_dict_round_trip_continues_identically():
    def fresh():
        torch.manual_seed(0)
        model = tiny_resnet()
        return model, make_wrapper(model)

    model_a, wrapper_a = fresh()
    for step in range(4):
        wrapper_a.step(*resnet_batch(seed=step))

    model_b, wrapper_b = fresh()
    for step in range(2):
        wrapper_b.step(*resnet_batch(seed=step))
    saved = copy.deepcopy((model_b.state_dict(), wrapper_b.optimizer.state_dict(), wrapper_b.state_dict()))
    model_c, wrapper_c = fresh()
    model_c.load_state_dict(saved[0])
    wrapper_c.optimizer.load_state_dict(saved[1])
    wrapper_c.load_state_dict(saved[2])
    for step in range(2, 4):
        wrapper_c.step(*resnet_batch(seed=step))
    for a, c in zip(
        list(model_a.parameters()) + list(wrapper_a.mentor.parameters()),
        list(model_c.parameters()) + list(wrapper_c.mentor.parameters()),
    ):
        assert torch.equal(a, c)
    assert wrapper_c.num_updates == 4


def test_a_state_saved_before_the_first_meta_step_by_an_earlier_version_loads_seeded():
    """Earlier versions made the synthetic labels' generator at the first meta step, so a state saved before it has
    none: loading one leaves the seeded generator a new wrapper has, which every state dict now holds (a state
    loaded in place, as torch.distributed.checkpoint loads, needs its entry)."""
    torch.manual_seed(0)
    wrapper = make_wrapper(tiny_resnet())
    state = wrapper.state_dict()
    assert list(state["generators"]) == ["cpu"]  # from construction, before any meta step
    earlier = {**copy.deepcopy(state), "generators": {}}
    torch.manual_seed(0)
    loaded = make_wrapper(tiny_resnet())
    loaded.load_state_dict(earlier)
    assert torch.equal(loaded.state_dict()["generators"]["cpu"], state["generators"]["cpu"])


def test_mlp_without_timm_api_uses_outputs_as_features(mlp64, batch64):
    wrapper = make_wrapper(mlp64, num_neighbors=3)
    stats = wrapper.step(*batch64)
    assert 0.0 < stats["labels_changed"] <= 0.5
    assert isinstance(mlp64, TinyMLP)


def test_for_run_length_scales_the_schedules_and_keeps_overrides():
    config = MetaNoiseConfig.for_run_length(1000, meta_weight=2.0)
    assert (config.ramp_start, config.ramp_end) == (100, 400) and config.meta_weight == 2.0
    assert config.mentor_decay == pytest.approx(0.98) and config.mentor_decay_ramp == pytest.approx(0.95)
    short = MetaNoiseConfig.for_run_length(10)
    assert (short.mentor_decay, short.mentor_decay_ramp) == (0.9, 0.8)  # clamped
    long = MetaNoiseConfig.for_run_length(10**7, ramp_start=0)
    assert (long.mentor_decay, long.mentor_decay_ramp, long.ramp_start) == (0.999, 0.99, 0)
    with pytest.raises(ValueError, match="total_updates must be an integer >= 1"):
        MetaNoiseConfig.for_run_length(0)
    with pytest.raises(TypeError, match="unknown MetaNoiseConfig field"):
        MetaNoiseConfig.for_run_length(100, meta_wieght=1.0)
