"""`UpdateState`: where the optimizer updates stand, answered in one place.

As Accelerate's ``GradientState`` owns the accumulation state of a loop, `UpdateState` owns
MLNT's: whether this micro-batch ends an update or only accumulates (``ends_update``), whether
a gradient is held between micro-batches (``accumulating``), what the last micro-batch did
(``last``: accumulating, stepped or skipped), and the counters of updates made and skipped that
drive the meta-weight ramp and the mentor's decay. `MetaNoiseWrapper`, its `GradientUpdate` and
`noisy_meta.timm.MetaNoiseTask` each read and record it here, not each in its own way.
"""

from __future__ import annotations

from typing import Any, Literal

#: What a micro-batch did: held its gradient for the next one, made an update, or skipped it.
Result = Literal["accumulating", "stepped", "skipped"]


class UpdateState:
    """The update counters and the accumulation state of one training loop.

    Args:
        runtime: what says whether this micro-batch ends an update
            (`noisy_meta.runtime.TrainingRuntime.ends_update`); ``None``: every micro-batch does
            (a loop of its own, such as timm's ``train.py``, that calls `record_update` itself).
    """

    def __init__(self, runtime: Any | None = None) -> None:
        self.runtime = runtime
        #: Optimizer updates made (the schedules' step).
        self.num_updates = 0
        #: Updates skipped because a loss or a gradient was not finite.
        self.num_skipped = 0
        #: True between the micro-batches of an accumulation window: the gradient is kept.
        self.accumulating = False
        #: What the last micro-batch did; ``None`` before the first.
        self.last: Result | None = None

    @property
    def ends_update(self) -> bool:
        """Whether this micro-batch ends an update (False inside an accumulation window)."""
        return True if self.runtime is None else self.runtime.ends_update

    def hold(self) -> None:
        """This micro-batch only accumulated: keep the gradient for the next one."""
        self.accumulating, self.last = True, "accumulating"

    def close_window(self) -> None:
        """The accumulation window is over (an update was applied, skipped or rolled back)."""
        self.accumulating = False

    def record(self, stepped: bool, complete: bool = True) -> None:
        """What an update-ending micro-batch did: ``stepped`` (the optimizer updated the parameters),
        ``complete`` (nothing of it was skipped). A skipped part is counted in ``num_skipped``."""
        self.close_window()
        self.last = "stepped" if stepped and complete else "skipped"
        if not complete:
            self.num_skipped += 1

    def record_update(self) -> None:
        """One more optimizer update made (after the mentor's average of it)."""
        self.num_updates += 1

    def state_dict(self) -> dict[str, int]:
        return {"num_updates": self.num_updates, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state.get("num_skipped", 0))
