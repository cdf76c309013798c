"""Fine-tuning timm models on noisy labels with Accelerate: the code behind `examples/finetune.py`.

``python -m noisy_meta.finetune --help`` (or ``accelerate launch examples/finetune.py``) lists the
flags. `run_command` is the command line (one-line errors, status 2); `main` runs with a list of
flags and `run` with checked `RunSettings` (`parse_settings`), both raising their errors.
`write_report` redraws a finished run's ``report.png``; `export_model` is ``--export-dir``. Names
load on first use, so ``--help`` does not wait for torch.
"""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _lazy_names

if TYPE_CHECKING:
    from .cli import build_parser, main, parse_settings, resolve_meta_config, run_command
    from .export import export_model
    from .flags import read_config_file
    from .report import write_report
    from .settings import RunContext, RunSettings
    from .trainer import run

#: Names imported on first use, read from the ``if TYPE_CHECKING:`` block above.
_LAZY = _lazy_names(Path(__file__).read_text())


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'noisy_meta.finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "RunContext",
    "RunSettings",
    "build_parser",
    "export_model",
    "main",
    "parse_settings",
    "read_config_file",
    "resolve_meta_config",
    "run",
    "run_command",
    "write_report",
]
