"""noisy-meta: MLNT (Li et al., "Learning to Learn from Noisy Labeled Data", CVPR 2019) for timm.

Wrap a model and its optimizer::

    wrapper = noisy_meta.MetaNoiseWrapper(model, optimizer, num_synthetic=10)
    for inputs, targets in loader:
        stats = wrapper.step(inputs, targets)

or keep your own loop with `MetaNoiseWrapper.meta_backward` and `MetaNoiseWrapper.update_mentor`.
With Accelerate pass ``accelerator=`` (mixed precision, DDP, accumulation); `noisy_meta.finetune`
is the complete command-line fine-tuning run (``accelerate launch examples/finetune.py``).
"""

from .compat import SecondOrderUnsupportedError, make_twice_differentiable
from .config import FastParamsSpec, FeatureSourceSpec, MetaNoiseConfig
from .fast_weights import kl_to_mentor, meta_losses, select_fast_params
from .noise import CIFAR10_ASYMMETRIC_MAP, NoisyLabels, inject_noise
from .synthetic import (
    SyntheticLabels,
    nearest_neighbors,
    neighbor_label_transfer,
    num_perturbed,
)
from .wrapper import MetaNoiseWrapper

__version__ = "0.1.0"

__all__ = [
    "CIFAR10_ASYMMETRIC_MAP",
    "FastParamsSpec",
    "FeatureSourceSpec",
    "MetaNoiseConfig",
    "MetaNoiseWrapper",
    "NoisyLabels",
    "SecondOrderUnsupportedError",
    "SyntheticLabels",
    "inject_noise",
    "kl_to_mentor",
    "make_twice_differentiable",
    "meta_losses",
    "nearest_neighbors",
    "neighbor_label_transfer",
    "num_perturbed",
    "select_fast_params",
]
