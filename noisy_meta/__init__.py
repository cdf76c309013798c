"""noisy-meta: MLNT (Li et al., "Learning to Learn from Noisy Labeled Data", CVPR 2019) for timm.

Wrap a model and its optimizer::

    wrapper = noisy_meta.MetaNoiseWrapper(model, optimizer, num_synthetic=10)
    for inputs, targets in loader:
        stats = wrapper.step(inputs, targets)

or keep your own loop with `MetaNoiseWrapper.meta_backward` and `MetaNoiseWrapper.update_mentor`.
With Accelerate pass ``accelerator=`` (mixed precision, DDP, accumulation); `noisy_meta.finetune`
is the complete command-line fine-tuning run (``accelerate launch examples/finetune.py``);
`noisy_meta.timm.MetaNoiseTask` runs MLNT inside timm's own ``train.py`` (a ``TrainingTask``).
Noisy data sets: `add_label_noise` / `add_open_set_noise` / `with_label_columns` (Hugging Face
datasets), `inject_noise` / `open_set_noise` / `confusion_labels` on label arrays; iterative
training with data cleaning: `noisy_meta.labels.cleaning`; noise detection before training from
pretrained features: `detect_label_noise`; robust losses on the given labels: `noisy_meta.losses`
(`MetaNoiseConfig.criterion`).
"""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FastParamsSpec, FeatureSourceSpec, MetaNoiseConfig
from .labels.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    OUTSIDE,
    NoisyLabels,
    OpenSetNoise,
    confusion_labels,
    inject_noise,
    open_set_noise,
)

if TYPE_CHECKING:
    from .compat import SecondOrderUnsupportedError, make_twice_differentiable
    from .fast_weights import FastStepSize, InnerStep, kl_to_mentor, meta_losses, select_fast_params
    from .labels.cleaning import (
        CleaningConfig,
        CleaningReport,
        DetectionReport,
        clean_dataset,
        find_label_issues,
        iterate_with_cleaning,
        predict_probabilities,
        save_cleanlab_inputs,
    )
    from .labels.detection import LabelNoiseDetection, detect_label_noise, extract_features
    from .labels.dynamics import AreaUnderMargin
    from .labels.noisy_datasets import add_label_noise, add_open_set_noise, restrict_to_classes, with_label_columns
    from .losses import CrossEntropy, GeneralizedCrossEntropy, SymmetricCrossEntropy, make_criterion
    from .runtime import fully_shard_trunk
    from .synthetic import SyntheticLabels, nearest_neighbors, neighbor_label_transfer, num_perturbed
    from .update_state import UpdateState
    from .wrapper import MetaNoiseWrapper

__version__ = "0.2.0"


def _lazy_names(source: str) -> dict[str, str]:
    """Each name the ``if TYPE_CHECKING:`` block imports, and the module it comes from: that block is the one list
    of what loads on first use (type checkers read it; `__getattr__` imports from it)."""
    import ast

    block = next(
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    return {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}


#: Names imported on first use. ``import noisy_meta`` loads neither torch nor Hugging Face
#: ``datasets`` (only the config and the noise functions, which need numpy), so that the command
#: line answers --help in 0.2 s instead of the 4.5 s that importing every name takes.
_LAZY = _lazy_names(Path(__file__).read_text())


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'noisy_meta' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AreaUnderMargin",
    "CIFAR10_ASYMMETRIC_MAP",
    "CleaningConfig",
    "CleaningReport",
    "CrossEntropy",
    "DetectionReport",
    "FastParamsSpec",
    "FastStepSize",
    "FeatureSourceSpec",
    "GeneralizedCrossEntropy",
    "InnerStep",
    "LabelNoiseDetection",
    "MetaNoiseConfig",
    "MetaNoiseWrapper",
    "NoisyLabels",
    "OUTSIDE",
    "OpenSetNoise",
    "SecondOrderUnsupportedError",
    "SymmetricCrossEntropy",
    "SyntheticLabels",
    "UpdateState",
    "add_label_noise",
    "add_open_set_noise",
    "clean_dataset",
    "confusion_labels",
    "detect_label_noise",
    "extract_features",
    "find_label_issues",
    "fully_shard_trunk",
    "inject_noise",
    "iterate_with_cleaning",
    "kl_to_mentor",
    "make_criterion",
    "make_twice_differentiable",
    "meta_losses",
    "nearest_neighbors",
    "neighbor_label_transfer",
    "num_perturbed",
    "open_set_noise",
    "predict_probabilities",
    "restrict_to_classes",
    "save_cleanlab_inputs",
    "select_fast_params",
    "with_label_columns",
]


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
