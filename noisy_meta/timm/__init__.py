"""MLNT inside timm's own ``train.py``: `MetaNoiseTask`, a ``timm.task.TrainingTask``."""

from .task import MetaNoiseTask

__all__ = ["MetaNoiseTask"]
