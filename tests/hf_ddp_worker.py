"""Worker of the two-process `MetaNoiseTrainer` test: trains 3 updates, writes each rank's states' sums.

Launched by tests/test_hf_trainer.py with ``accelerate launch --multi_gpu --num_processes 2``
(CPU processes, gloo). Argument: the output directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from test_hf_trainer import CONFIG, Images, arguments

from noisy_meta.hf import MetaNoiseTrainer

from helpers import tiny_resnet

output = Path(sys.argv[1])
torch.manual_seed(0)
model = tiny_resnet()
args = arguments(output, per_device_train_batch_size=4, max_steps=3, ddp_backend="gloo")
trainer = MetaNoiseTrainer(model=model, args=args, train_dataset=Images(24), meta_config=CONFIG)
trainer.train()
rank = trainer.args.process_index
states = {
    "world_size": trainer.args.world_size,
    "num_updates": trainer.meta.num_updates,
    "student": {k: float(v.double().sum()) for k, v in model.state_dict().items()},
    "mentor": {k: float(v.double().sum()) for k, v in trainer.meta.mentor.state_dict().items()},
}
(output / f"rank{rank}.json").write_text(json.dumps(states))
assert transformers.__version__
