"""Short runs with the wrapper's defaults: told the run length, the schedules fit the run; not told, a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
from noisy_meta.config import run_length_schedule
from noisy_meta.core import SHORT_RUN_WARNING_AFTER

from helpers import TinyMLP, vector_batch


def wrapper_for(total_updates=None, config=None, **overrides):
    torch.manual_seed(0)
    model = TinyMLP().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return MetaNoiseWrapper(model, optimizer, config, total_updates=total_updates, num_neighbors=3, **overrides)


def test_total_updates_fits_the_schedules_to_the_run():
    """An Accelerate cv_example-sized run (45 updates): the meta step starts and the mentor keeps up."""
    wrapper = wrapper_for(total_updates=45)
    expected = run_length_schedule(45)
    assert {name: getattr(wrapper.config, name) for name in expected} == expected
    weights = []
    for step in range(45):
        weights.append(wrapper.step(*vector_batch(step))["meta_weight"])
    assert weights[0] == 0.0 and weights[-1] == 1.0  # off at first, full weight by the end
    assert sum(w > 0 for w in weights) >= 40
    assert wrapper.config.mentor_decay <= 0.9  # averages over a few updates, not ~1000


def test_explicit_schedule_values_win_over_total_updates():
    wrapper = wrapper_for(total_updates=45, ramp_start=0)
    assert wrapper.config.ramp_start == 0 and wrapper.config.ramp_end == run_length_schedule(45)["ramp_end"]
    config = MetaNoiseConfig(mentor_decay=0.95)
    assert wrapper_for(total_updates=45, config=config).config.mentor_decay == 0.95


def test_a_bad_total_updates_is_refused():
    with pytest.raises(ValueError, match="total_updates must be an integer >= 1"):
        wrapper_for(total_updates=0)


def run(wrapper, updates):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(updates):
            wrapper.update_mentor()  # the counter alone drives the schedule
    return [w for w in caught if "meta step is still off" in str(w.message)]


def test_library_schedule_on_a_short_run_warns_once():
    caught = run(wrapper_for(), SHORT_RUN_WARNING_AFTER + 5)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"after {SHORT_RUN_WARNING_AFTER} updates" in message and "total_updates=" in message


@pytest.mark.parametrize(
    "kwargs",
    [{"total_updates": 1000}, {"ramp_start": 10, "ramp_end": 50}, {"meta_weight": 0.0}],
    ids=["told the run length", "own schedule", "meta step off on purpose"],
)
def test_no_warning_when_the_schedule_was_chosen(kwargs):
    assert run(wrapper_for(**kwargs), SHORT_RUN_WARNING_AFTER + 5) == []


def digits_run(**overrides) -> tuple[float, float]:
    """The short run of the report, scaled to the suite: scikit-learn digits (8 x 8), 50% symmetric
    noise, a small ResNet from scratch, 440 updates with a cosine learning rate, the ramp given and the
    mentor's decays left at the library's long-run values. Clean test accuracy of student and mentor."""
    from sklearn.datasets import load_digits

    from noisy_meta import inject_noise

    from helpers import tiny_resnet

    data = load_digits()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.target), generator=generator)
    images = torch.tensor(data.images, dtype=torch.float32)[order].div(8.0).sub(1.0).unsqueeze(1).expand(-1, 3, -1, -1)
    labels = torch.tensor(data.target)[order]
    train_x, test_x, test_y = images[:1400], images[1400:], labels[1400:]
    train_y = torch.from_numpy(inject_noise(labels[:1400].numpy(), 10, "symmetric", 0.5, seed=0).labels)
    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 440)
    config = MetaNoiseConfig(ramp_start=0, ramp_end=88, num_synthetic=1, first_order=True, seed=0, **overrides)
    wrapper = MetaNoiseWrapper(model, optimizer, config)
    while wrapper.num_updates < 440:
        for batch in torch.randperm(1400, generator=generator)[:1376].split(32):
            wrapper.step(train_x[batch], train_y[batch])
            scheduler.step()
            if wrapper.num_updates == 440:
                break
    with torch.no_grad():
        return tuple(float((m.eval()(test_x).argmax(1) == test_y).float().mean()) for m in (model, wrapper.mentor))


@pytest.mark.slow
def test_a_short_run_with_the_long_run_decays_gets_a_mentor_as_good_as_its_student():
    """The mentor's decay warms up (``mentor_warmup``): with the ramp given and the decays left at
    0.99 / 0.999 the mentor ends within 2 points of its student; without the warm-up it is still a
    blend with the random initialisation (benchmarks/mentor_gap.py has the full-size measurement)."""
    student, mentor = digits_run()
    assert student > 0.6 and mentor >= student - 0.02, (student, mentor)
    student, mentor = digits_run(mentor_warmup=False)
    assert mentor < student - 0.1, (student, mentor)
