"""Does a meta step that is denser early (or late) in the run beat the affordable preset's every 5th update?

    python benchmarks/meta_schedule_probe.py --tune --settings sym50 sym80 pair40 inst40 \
        --methods dense_early dense_late dense_early_full --no-write

Runs `accuracy.py` (every flag of it works here) with three more methods, each one synthetic
second-order set with ``meta_every`` changing at half of the run:

- ``dense_early``: every 3rd update until half of the run, every 10th after, the meta steps
  weighing ``sqrt(meta_every)`` (``compensate_meta_every="sqrt"``);
- ``dense_early_full``: the same with the weight ``meta_every`` x (``compensate_meta_every=True``);
- ``dense_late``: every 10th until half of the run, every 3rd after, sqrt weights.

About as many meta steps as the preset's (18% of the updates). An exploration for issue 25
(benchmarks/RESULTS.md); the package has no such schedule, so this file gives the config one
(`ScheduledConfig`). `accuracy.py`'s worker processes are forked, so they see the methods added here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import accuracy

from noisy_meta import MetaNoiseConfig
from noisy_meta.config import FAST_PRESET

#: The fields `ScheduledConfig` adds to `MetaNoiseConfig`.
SCHEDULE_FIELDS = ("early_every", "late_every", "switch_fraction")


@dataclass(frozen=True)
class ScheduledConfig(MetaNoiseConfig):
    """A `MetaNoiseConfig` whose ``meta_every`` is ``early_every`` before update ``switch_at``, ``late_every`` after."""

    early_every: int = 3
    late_every: int = 10
    switch_fraction: float = 0.5
    switch_at: int = 0

    def meta_every_at(self, step: int) -> int:
        return self.early_every if step < self.switch_at else self.late_every

    def meta_weight_at(self, step: int) -> float:
        """`MetaNoiseConfig.meta_weight_at` with the ``meta_every`` of ``step``'s half of the run."""
        return MetaNoiseConfig.meta_weight_at(dataclasses.replace(self, meta_every=self.meta_every_at(step)), step)


class ScheduledConfigs:
    """Stands in for `MetaNoiseConfig` inside `accuracy.py`: ``for_run_length`` builds a `ScheduledConfig`."""

    def __call__(self, *args: Any, **kwargs: Any) -> MetaNoiseConfig:
        return MetaNoiseConfig(*args, **kwargs)

    @staticmethod
    def for_run_length(total: int, **overrides: Any) -> MetaNoiseConfig:
        schedule = {name: overrides.pop(name) for name in SCHEDULE_FIELDS if name in overrides}
        base = MetaNoiseConfig.for_run_length(total, **overrides)
        if not schedule:
            return base
        fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(base)}
        switch_at = round(schedule.get("switch_fraction", 0.5) * total)
        return ScheduledConfig(**fields, **schedule, switch_at=switch_at)


SQRT = {**FAST_PRESET, "compensate_meta_every": "sqrt"}
METHODS = {
    "dense_early": {**SQRT, "early_every": 3, "late_every": 10},
    "dense_late": {**SQRT, "early_every": 10, "late_every": 3},
    "dense_early_full": {**FAST_PRESET, "early_every": 3, "late_every": 10},
}
LABELS = {
    "dense_early": "one set every 3rd update until half the run, every 10th after (sqrt weights)",
    "dense_late": "one set every 10th update until half the run, every 3rd after (sqrt weights)",
    "dense_early_full": "one set every 3rd update until half the run, every 10th after (full weights)",
}


def main() -> None:
    accuracy.MetaNoiseConfig = ScheduledConfigs()
    accuracy.METHODS.update(METHODS)
    accuracy.LABELS.update(LABELS)
    accuracy.main()


if __name__ == "__main__":
    main()
