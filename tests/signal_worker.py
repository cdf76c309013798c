"""A fine-tuning run that sends itself a signal at a chosen update; tests/test_preemption.py runs it.

``SIGNAL_AT=<update>:<signal>[:<rank>]``: just before update ``<update>`` (counted from 0) the
process (only rank ``<rank>`` when given) sends itself ``SIG<signal>`` (KILL, TERM, INT), once,
and writes the time it did so to ``SIGNAL_STAMP`` when set. Without ``SIGNAL_AT`` it is the
plain command line.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from noisy_meta import MetaNoiseWrapper
from noisy_meta.finetune import cli


def signal_at(update: int, name: str) -> None:
    real_step = MetaNoiseWrapper.step

    def step(self, inputs, targets):
        if self.num_updates == update and not getattr(step, "fired", False):
            step.fired = True
            if os.environ.get("SIGNAL_STAMP"):
                with open(os.environ["SIGNAL_STAMP"], "w") as stamp:
                    stamp.write(str(time.time()))
            os.kill(os.getpid(), signal.Signals["SIG" + name])
        return real_step(self, inputs, targets)

    MetaNoiseWrapper.step = step


def main() -> None:
    if os.environ.get("SIGNAL_AT"):
        update, name, *rank = os.environ["SIGNAL_AT"].split(":")
        if not rank or os.environ.get("RANK", "0") == rank[0]:
            signal_at(int(update), name)
    cli.run_command(sys.argv[1:])


if __name__ == "__main__":
    main()
