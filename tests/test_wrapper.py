"""Invariants of a whole iteration: BatchNorm buffers, determinism, mentor, schedules, own loops."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
from noisy_meta.fast_weights import forward_with_cloned_buffers, select_fast_params

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
    assert student._mentor.decay_at(0) == 0.0 and passed._mentor.decay_at(0) == 0.99
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
    assert student > 0.8
    assert mentor > 0.8


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


def test_mlp_without_timm_api_uses_outputs_as_features(mlp64, batch64):
    wrapper = make_wrapper(mlp64, num_neighbors=3)
    stats = wrapper.step(*batch64)
    assert 0.0 < stats["labels_changed"] <= 0.5
    assert isinstance(mlp64, TinyMLP)


@pytest.mark.parametrize(
    "name, first, last",
    [("resnet18", "layer4.0.conv1.weight", "fc.bias"), ("test_vit", "blocks.5.norm1.weight", "head.bias")],
)
def test_last_stage_selects_the_last_feature_stage_and_everything_after(name, first, last):
    import timm

    from noisy_meta import select_fast_params

    model = timm.create_model(name, num_classes=4)
    selected = select_fast_params(model, "last_stage")
    names = [n for n, _ in model.named_parameters()]
    assert selected[0] == first and selected[-1] == last
    assert selected == names[names.index(first) :]  # contiguous: the stage, final norms, the head
    assert set(select_fast_params(model, "head")) < set(selected)


def test_meta_every_runs_the_meta_step_on_every_nth_update_only():
    torch.manual_seed(0)
    model = tiny_resnet()
    wrapper = make_wrapper(model, meta_every=3)
    x, y = resnet_batch()
    weights = [wrapper.step(x, y)["meta_weight"] for _ in range(6)]
    assert weights == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    config = MetaNoiseConfig(ramp_start=4, ramp_end=4, meta_every=2)
    assert [config.meta_weight_at(step) for step in range(8)] == [0, 0, 0, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("mode, same_params", [("head", ["fc.*"]), ("last_stage", ["layer4.*", "fc.*"])])
def test_cheap_modes_share_the_trunk_and_equal_the_general_path(first_order, mode, same_params):
    """`fast_params="head"` / `"last_stage"` (trunk once) == the same parameters selected by pattern (trunk per set)."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    general_model = copy.deepcopy(model)
    shared = make_wrapper(model, fast_params=mode, first_order=first_order)
    general = make_wrapper(general_model, fast_params=same_params, first_order=first_order)
    assert select_fast_params(model, mode) == select_fast_params(general_model, same_params)
    calls = []
    handle = model.layer1.register_forward_hook(
        lambda _m, args, _out: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    for seed in range(3):
        x, y = resnet_batch(seed=seed)
        a, b = shared.step(x.double(), y), general.step(x.double(), y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    handle.remove()
    assert shared.trunk_shared is True
    full_batch = [grad for size, grad in calls if size == 12]
    assert len(full_batch) == 1 + 3  # the one-time check, then the student's forward only, once per step
    skipped = [(size, grad) for size, grad in calls if size != 12]  # last_stage: the trunk before the substitution
    assert all(size == 2 and not grad for size, grad in skipped) and (len(skipped) > 0) == (mode == "last_stage")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


def test_the_shared_trunk_with_the_relative_step_equals_the_general_path():
    """The scale-free step on the last stage: trunk once == the same parameters by pattern (trunk per set)."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    general_model = copy.deepcopy(model)
    step = dict(inner_step="relative", inner_radius=0.02)
    shared = make_wrapper(model, fast_params="last_stage", **step)
    general = make_wrapper(general_model, fast_params=["layer4.*", "fc.*"], **step)
    for seed in range(2):
        x, y = resnet_batch(seed=seed)
        a, b = shared.step(x.double(), y), general.step(x.double(), y)
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    assert shared.trunk_shared is True
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode, same_params", [("head", ["fc.*"]), ("last_stage", ["layer4.*", "fc.*"])])
def test_cheap_modes_with_a_frozen_trunk(mode, same_params):
    """Linear probing / last-stage tuning: a trunk without trainable parameters still trains the rest."""
    torch.manual_seed(0)
    model = tiny_resnet().double()
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix.rstrip("*")) for prefix in same_params))
    general_model = copy.deepcopy(model)
    shared, general = make_wrapper(model, fast_params=mode), make_wrapper(general_model, fast_params=same_params)
    x, y = resnet_batch()
    a, b = shared.step(x.double(), y), general.step(x.double(), y)
    assert shared.trunk_shared is True and a["skipped"] == 0.0
    assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-10)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, general_model.state_dict()[name], rtol=1e-10, atol=1e-12)


def test_head_mode_falls_back_when_the_model_is_not_its_timm_split():
    torch.manual_seed(0)
    model = tiny_resnet()
    model.forward = lambda x: type(model).forward(model, x) * 2.0  # no longer classifier(pre_logits)
    wrapper = make_wrapper(model, fast_params="head")
    stats = wrapper.step(*resnet_batch())
    assert wrapper.trunk_shared is False and stats["skipped"] == 0.0


@pytest.mark.parametrize("bypass", ["batch mean", "per sample"])
def test_last_stage_falls_back_when_the_input_reaches_the_output_around_the_stage(bypass):
    """A path from the input to the output that skips the last stage: no shared trunk, same training."""
    torch.manual_seed(0)
    model = tiny_resnet()
    extra = {"batch mean": lambda x: x.mean(), "per sample": lambda x: x.flatten(1).mean(1, keepdim=True)}[bypass]
    model.forward = lambda x: type(model).forward(model, x) + extra(x)
    general_model = copy.deepcopy(model)
    general_model.forward = lambda x: type(general_model).forward(general_model, x) + extra(x)
    wrapper = make_wrapper(model, fast_params="last_stage")
    general = make_wrapper(general_model, fast_params=["layer4.*", "fc.*"])
    x, y = resnet_batch()
    a, b = wrapper.step(x, y), general.step(x, y)
    assert wrapper.trunk_shared is False and torch.is_grad_enabled()
    assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-6)


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
