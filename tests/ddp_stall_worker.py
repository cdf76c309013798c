"""A rank that stalls in a real fine-tuning run, run by tests/test_distributed.py under two processes.

``accelerate launch --multi_gpu --num_processes 2 tests/ddp_stall_worker.py <finetune flags>``:
rank 1 stops answering (sleeps) when the first validation starts; rank 0 waits for it in the
validation's all-gather, and the run must stop after ``--rank-timeout`` with one line.
"""

from __future__ import annotations

import os
import sys
import time

from noisy_meta.finetune import cli, trainer


def main() -> None:
    if os.environ.get("RANK") == "1":

        def stalled_validate(*args, **kwargs):
            time.sleep(3600)

        trainer.validate = stalled_validate
    cli.run_command(sys.argv[1:])


if __name__ == "__main__":
    main()
