"""A rank that stalls or dies in a real fine-tuning run, run by tests/test_distributed.py under two processes.

``accelerate launch --multi_gpu --num_processes 2 tests/ddp_stall_worker.py <finetune flags>``:
when the first validation starts, rank 1 stops answering (sleeps an hour) or, with
``RANK_FAULT=kill``, kills itself with SIGKILL. Rank 0 waits for it in the validation's
all-gather, and the run must stop within ``--rank-timeout`` with a message.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from noisy_meta.finetune import cli, trainer


def main() -> None:
    if os.environ.get("RANK") == "1":

        def failing_validate(*args, **kwargs):
            if os.environ.get("RANK_FAULT") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)

        trainer.validate = failing_validate
    cli.run_command(sys.argv[1:])


if __name__ == "__main__":
    main()
