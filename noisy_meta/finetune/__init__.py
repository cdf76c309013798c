"""Fine-tuning timm models on noisy labels with Accelerate: the code behind `examples/finetune.py`.

``python -m noisy_meta.finetune --help`` (or ``accelerate launch examples/finetune.py``) lists the
flags; `main` runs with a list of flags, `run` with parsed arguments.
"""

from .cli import build_parser, resolve_meta_config
from .trainer import main, run

__all__ = ["build_parser", "main", "resolve_meta_config", "run"]
