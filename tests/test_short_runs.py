"""Short runs with the wrapper's defaults: told the run length, the schedules fit the run; not told, a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
from noisy_meta.config import run_length_schedule
from noisy_meta.wrapper import SHORT_RUN_WARNING_AFTER

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
