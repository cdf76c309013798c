"""`noisy_meta.timm.MetaNoiseTask` driven in the order of timm's ``train_one_epoch``, against `MetaNoiseWrapper.step`.

Compared: student parameters and BatchNorm buffers, the mentor and the update counter, on
CPU. In float32 the first update agrees to 1e-6; later ones drift apart by rounding alone (the
task sums CE and the M sets' losses into one backward, `step` backpropagates set by set: after
4 second-order updates the weights differ by up to 1e-5 in float32 and 1e-14 in float64), so
runs of several updates are compared in float64, to 1e-10. Two processes run in
`tests/ddp_task_worker.py`.
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_distributed import TESTS, launch
from timm.utils import NativeScaler
from timm_loop import train_like_timm

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper, SecondOrderUnsupportedError
from noisy_meta.timm import MetaNoiseTask
from noisy_meta.timm.task import TASK_DEFAULTS

from helpers import TinyMLP, image_batch, settings, state, tiny_resnet

#: Agreement with `MetaNoiseWrapper.step`, and the updates compared, per dtype.
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}
UPDATES = {torch.float32: 1, torch.float64: 4}
DTYPES = list(TOLERANCE)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def batches(count: int, first_seed: int = 0, dtype: torch.dtype = torch.float32) -> list:
    """``count`` image batches (inputs in ``dtype``, class-index targets)."""
    return [(inputs.to(dtype), targets) for inputs, targets in map(image_batch, range(first_seed, first_seed + count))]


def max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max(float((ours[k].double() - v.double()).abs().max()) for k, v in theirs.items() if v.numel())


def assert_same_training(model, task, reference_model, reference, dtype) -> None:
    assert task.num_updates == reference.num_updates
    assert max_difference(state(model), state(reference_model)) < TOLERANCE[dtype]
    assert max_difference(state(task.mentor), state(reference.mentor)) < TOLERANCE[dtype]


def task_and_reference(dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(0)
    model = tiny_resnet().to(dtype)
    reference_model = copy.deepcopy(model)
    task = MetaNoiseTask(model, verbose=False, config=MetaNoiseConfig(), **settings(**overrides))
    return model, task, reference_model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first_order", [True, False])
def test_the_task_in_timms_loop_equals_the_wrapper_step(first_order, dtype):
    model, task, reference_model = task_and_reference(dtype, first_order=first_order)
    data = batches(UPDATES[dtype], dtype=dtype)
    updates = train_like_timm(task, sgd(model), data)

    reference = MetaNoiseWrapper(reference_model, sgd(reference_model), **settings(first_order=first_order))
    for inputs, targets in data:
        reference.step(inputs, targets)
    assert updates == UPDATES[dtype]
    assert_same_training(model, task, reference_model, reference, dtype)
    # The loss the script backpropagates and logs is CE + w * J.
    inputs, targets = image_batch(9)
    result = task(inputs.to(dtype), targets)
    assert set(result) >= {"loss", "output", "ce_loss", "meta_loss"} and result["meta_loss"] > 0
    torch.testing.assert_close(result["loss"], F.cross_entropy(result["output"], targets) + result["meta_loss"])
    # the meta step's figures for the script's logs: the unweighted loss times its weight is the meta loss
    figures = {key: float(value) for key, value in result.items() if key.startswith("meta/")}
    assert figures["meta/meta_weight"] > 0 and figures["meta/fast_divergence"] > 0 and figures["meta/fast_step"] > 0
    weighted = figures["meta/meta_loss"] * figures["meta/meta_weight"]
    assert weighted == pytest.approx(float(result["meta_loss"]), rel=1e-3)


@pytest.mark.parametrize("inner_step", ["relative", "global_relative"])
def test_the_scale_free_step_and_a_robust_loss_train_the_same_in_the_task_and_the_wrapper(inner_step):
    """The fine-tuning recipe's pieces reach the task as they reach the wrapper (float64, 4 updates)."""
    dtype = torch.float64
    overrides = dict(first_order=False, inner_step=inner_step, inner_radius=0.01, criterion="gce")
    model, task, reference_model = task_and_reference(dtype, **overrides)
    data = batches(UPDATES[dtype], dtype=dtype)
    train_like_timm(task, sgd(model), data)
    reference = MetaNoiseWrapper(reference_model, sgd(reference_model), **settings(**overrides))
    for inputs, targets in data:
        reference.step(inputs, targets)
    assert_same_training(model, task, reference_model, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_task_under_timms_native_scaler_equals_the_wrapper_with_its_scaler(dtype):
    """A power-of-two loss scale changes nothing: inner and outer gradients are unscaled exactly."""
    model, task, reference_model = task_and_reference(dtype, first_order=False)
    loss_scaler = NativeScaler(device="cpu")
    task.loss_scaler = loss_scaler
    data = batches(UPDATES[dtype], dtype=dtype)
    train_like_timm(task, sgd(model), data, loss_scaler=loss_scaler, clip_grad=1.0)

    scaler = torch.amp.GradScaler("cpu")
    config = settings(first_order=False, clip_grad=1.0)
    reference = MetaNoiseWrapper(reference_model, sgd(reference_model), scaler=scaler, **config)
    for inputs, targets in data:
        reference.step(inputs, targets)
    assert loss_scaler._scaler.get_scale() == scaler.get_scale() == 2.0**16
    assert_same_training(model, task, reference_model, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_task_with_gradient_accumulation_of_two_equals_the_wrapper_accumulating(make_accelerator, dtype):
    model, task, reference_model = task_and_reference(dtype, first_order=False)
    micro_batches = batches(2 * UPDATES[dtype], first_seed=20, dtype=dtype)
    updates = train_like_timm(task, sgd(model), micro_batches, accum_steps=2)

    accelerator = make_accelerator(gradient_accumulation_steps=2)
    prepared, reference_optimizer = accelerator.prepare(reference_model, sgd(reference_model))
    reference = MetaNoiseWrapper(prepared, reference_optimizer, accelerator=accelerator, **settings(first_order=False))
    for inputs, targets in micro_batches:
        with accelerator.accumulate(prepared):
            reference.step(inputs, targets)
    assert updates == UPDATES[dtype]
    assert_same_training(model, task, reference.module, reference, dtype)


def test_two_processes_through_prepare_distributed_equal_the_wrapper(tmp_path):
    path = tmp_path / "results.json"
    launch(TESTS / "ddp_task_worker.py", str(path))
    results = json.loads(path.read_text())
    assert results["world_size"] == 2
    for run in ("float32_accumulate_1", "float64_accumulate_1", "float64_accumulate_2"):
        dtype = torch.float64 if run.startswith("float64") else torch.float32
        assert results[f"{run}_updates"] == results[f"{run}_reference_updates"] > 0, run
        assert results[f"{run}_max_difference"] < TOLERANCE[dtype], (run, results[f"{run}_max_difference"])
        assert results[f"{run}_ranks_identical"] is True, run


def test_the_task_state_resumes_exactly():
    """`get_task_state` / `load_task_state` beside the model's and optimizer's: resume == uninterrupted."""
    model, task, _ = task_and_reference(first_order=True, seed=None)
    optimizer = sgd(model)
    data = batches(5, first_seed=40)
    train_like_timm(task, optimizer, data)

    model, task, _ = task_and_reference(first_order=True, seed=None)
    optimizer = sgd(model)
    done = train_like_timm(task, optimizer, data[:3])
    saved = copy.deepcopy(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "task": task.get_checkpoint_state()}
    )

    torch.manual_seed(123)  # another initialisation, and another drawn seed for the synthetic labels
    resumed_model = tiny_resnet()
    resumed = MetaNoiseTask(
        resumed_model, verbose=False, config=MetaNoiseConfig(), **settings(first_order=True, seed=None)
    )
    resumed_optimizer = sgd(resumed_model)
    resumed.load_checkpoint_state(saved["task"]["state_dict"], saved["task"]["task_state"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train_like_timm(resumed, resumed_optimizer, data[3:], num_updates=done)

    reference_model, reference_task = task_and_reference_after(data)
    assert resumed.num_updates == reference_task.num_updates == 5
    for ours, theirs in ((resumed_model, reference_model), (resumed.mentor, reference_task.mentor)):
        assert all(torch.equal(a, b) for a, b in zip(state(ours).values(), state(theirs).values()))


def task_and_reference_after(data):
    model, task, _ = task_and_reference(first_order=True, seed=None)
    train_like_timm(task, sgd(model), data)
    return model, task


def test_an_update_the_scaler_skipped_leaves_the_mentor_and_the_counter():
    model, task, _ = task_and_reference(first_order=True)
    optimizer = sgd(model)
    loss_scaler = NativeScaler(device="cpu")
    task.loss_scaler = loss_scaler
    inputs, targets = image_batch(0)
    inputs[0, 0, 0, 0] = float("inf")  # the gradients come out non-finite: the scaler skips the step
    before = [p.detach().clone() for p in model.parameters()]
    mentor_before = state(task.mentor)
    train_like_timm(task, optimizer, [(inputs, targets)], loss_scaler=loss_scaler)
    assert loss_scaler._scaler.get_scale() == 2.0**15  # it skipped, and halved its scale
    assert task.num_updates == 0 and task.updates.last == "skipped" and task.updates.num_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(state(task.mentor).values(), mentor_before.values()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    train_like_timm(task, optimizer, batches(1), loss_scaler=loss_scaler)  # and carries on
    assert task.num_updates == 1 and task.updates.last == "stepped"


def test_the_task_updates_timms_own_ema_and_can_return_the_mentor():
    model, task, _ = task_and_reference()
    timm_ema = task.setup_ema(decay=0.0)  # train.py's --model-ema
    train_like_timm(task, sgd(model), batches(1))
    assert all(torch.equal(a, b) for a, b in zip(state(timm_ema.module).values(), state(model).values()))
    assert task.get_eval_model(mentor=True) is task.mentor and task.get_eval_model() is model
    assert task.get_eval_model(ema=True) is timm_ema


# ------------------------------------------------------------------------------- what it refuses


def test_mixup_soft_targets_are_refused_with_a_message():
    _, task, _ = task_and_reference()
    inputs, targets = image_batch(0)
    soft = F.one_hot(targets, 4).float() * 0.9 + 0.025
    with pytest.raises(ValueError, match="mixup / cutmix soft targets"):
        task(inputs, soft)


def test_an_optimizer_that_needs_a_create_graph_backward_is_refused():
    model = tiny_resnet()
    optimizer = sgd(model)
    optimizer.is_second_order = True  # as timm's AdaHessian declares
    with pytest.raises(ValueError, match="is_second_order"):
        MetaNoiseTask(model, optimizer=optimizer, verbose=False, **settings())


def test_a_model_without_a_double_backward_is_named_with_the_fix_at_the_first_meta_step():
    class FunctionalHardsigmoidNet(TinyMLP):
        def forward(self, x):
            return self.fc2(F.hardsigmoid(self.fc1(x)))

    task = MetaNoiseTask(FunctionalHardsigmoidNet(), verbose=False, **settings(num_synthetic=2, num_neighbors=3))
    with pytest.raises(SecondOrderUnsupportedError, match=r"hardsigmoid.*first_order=True"):
        task(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))


def test_the_sequential_update_rule_is_refused():
    with pytest.raises(ValueError, match="update_rule='joint'"):
        MetaNoiseTask(tiny_resnet(), config=MetaNoiseConfig(update_rule="sequential"), verbose=False)


# ------------------------------------------------------------------------------- where train.py builds its task


def test_the_task_takes_classification_tasks_arguments_in_their_order():
    """train.py builds ``ClassificationTask(model=, criterion=, device=, dtype=, verbose=)``: the same
    call, positional or by keyword, builds a MetaNoiseTask; a config in the criterion's place is refused."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.task import ClassificationTask

    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    ours = list(inspect.signature(MetaNoiseTask).parameters)[:5]
    assert ours == ["model", "criterion", "device", "dtype", "verbose"]  # timm's main branch's order
    theirs = [name for name in inspect.signature(ClassificationTask).parameters if name in ours]
    assert theirs == ours  # the installed timm's, which also has criterion_kwargs after criterion
    positional = MetaNoiseTask(tiny_resnet(), loss_fn, torch.device("cpu"), torch.float32, False)
    by_keyword = MetaNoiseTask(
        model=tiny_resnet(), criterion=loss_fn, device=torch.device("cpu"), dtype=torch.float32, verbose=False
    )
    for task in (positional, by_keyword):
        assert task.criterion is loss_fn and task.device == torch.device("cpu") and not task.verbose
        assert task.config == MetaNoiseConfig(**TASK_DEFAULTS, criterion=loss_fn)
    with pytest.raises(TypeError, match="pass the MetaNoiseConfig as config="):
        MetaNoiseTask(tiny_resnet(), MetaNoiseConfig())


def test_fit_run_length_is_total_updates_given_at_construction():
    """The line after train.py's scheduler fits the schedules as ``total_updates=`` would; fields set
    by hand keep their values."""
    built = MetaNoiseTask(tiny_resnet(), verbose=False, total_updates=300, mentor_decay=0.95)
    fitted = MetaNoiseTask(tiny_resnet(), verbose=False, mentor_decay=0.95)
    assert fitted.config.ramp_start == MetaNoiseConfig().ramp_start  # the library's long-run schedule until fitted
    fitted.fit_run_length(300)
    assert fitted.config == built.config and fitted.config.ramp_end == round(0.4 * 300)
    assert fitted.config.mentor_decay == 0.95 and fitted.core.mentor.config is fitted.config
    assert fitted.meta_weight == built.meta_weight


def test_a_task_never_fitted_to_its_run_says_which_line_to_add():
    task = MetaNoiseTask(tiny_resnet(), verbose=False, num_synthetic=2, num_neighbors=3)
    with pytest.warns(UserWarning, match=r"task.fit_run_length\(num_epochs \* updates_per_epoch\)"):
        for _ in range(100):
            task.update_ema()
    fitted = MetaNoiseTask(tiny_resnet(), verbose=False)
    fitted.fit_run_length(500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(100):
            fitted.update_ema()


def test_the_meta_step_leaves_torchs_global_rng_where_it_was():
    """Building the task and its forwards draw nothing from torch's global RNG: timm's augmentations and sampler
    after them follow the run without MLNT, and a resumed run the uninterrupted one."""
    torch.manual_seed(0)
    model = tiny_resnet()
    before = torch.get_rng_state()
    task = MetaNoiseTask(model, verbose=False, config=MetaNoiseConfig(), **settings(seed=None))
    assert torch.equal(before, torch.get_rng_state())  # building it draws nothing either
    optimizer = sgd(model)
    for inputs, targets in batches(3):
        before = torch.get_rng_state()
        loss = task(inputs, targets)["loss"]
        assert torch.equal(before, torch.get_rng_state())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=task.num_updates)


class AugmentedBatches:
    """Batches whose augmentation draws from torch's global RNG as timm's transforms do, recording the RNG state
    after each batch's draw."""

    def __init__(self, count: int) -> None:
        self.clean, self.states = batches(count), []

    def __len__(self) -> int:
        return len(self.clean)

    def __iter__(self):
        for inputs, targets in self.clean:
            augmented = inputs + 0.1 * torch.randn_like(inputs)
            self.states.append(torch.get_rng_state())
            yield augmented, targets


def test_a_resumed_task_draws_the_augmentation_of_timms_classification_task():
    """timm's ``--resume`` restores no RNG state (train.py reseeds), so what MLNT owes is to change nothing of the
    random stream: with a global-RNG augmentation, the RNG state at every batch equals the one under timm's own
    ``ClassificationTask``, in a fresh run and after a task state loaded into a new task (a resume)."""
    from timm.task import ClassificationTask

    def run(meta: bool) -> list[torch.Tensor]:
        torch.manual_seed(5)
        model = tiny_resnet()
        if meta:
            task = MetaNoiseTask(model, verbose=False, config=MetaNoiseConfig(), **settings(seed=None))
        else:
            task = ClassificationTask(model, F.cross_entropy, verbose=False)
        first = AugmentedBatches(2)
        updates = train_like_timm(task, sgd(model), first)
        saved = task.get_task_state() if meta else None
        model = tiny_resnet()  # the resumed process: a new model and task, the checkpoint's state loaded
        if meta:
            task = MetaNoiseTask(model, verbose=False, config=MetaNoiseConfig(), **settings(seed=None))
            task.load_task_state(saved)
        else:
            task = ClassificationTask(model, F.cross_entropy, verbose=False)
        second = AugmentedBatches(2)
        train_like_timm(task, sgd(model), second, num_updates=updates)
        return first.states + second.states

    plain, meta = run(meta=False), run(meta=True)
    assert len(plain) == 4 and all(torch.equal(a, b) for a, b in zip(plain, meta, strict=True))
