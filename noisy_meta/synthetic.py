"""Synthetic noisy labels by random neighbour label transfer, vectorised over the batch and M.

The reference code loops over samples with one top-k per sample. Here one distance matrix
and one top-k serve the whole batch, and all M label sets are drawn in one go on the batch's
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticLabels:
    """M synthetic label sets for one batch.

    Attributes:
        labels: ``[M, B]`` int64, the synthetic labels.
        perturbed: ``[M, B]`` bool, positions chosen for perturbation (their label may still
            be unchanged when the chosen neighbour shares it).
        neighbors: ``[B, k]`` int64, each sample's k nearest other samples.
        changed_fraction: scalar tensor, mean fraction of labels that actually differ from
            the given ones.
    """

    labels: torch.Tensor
    perturbed: torch.Tensor
    neighbors: torch.Tensor
    changed_fraction: torch.Tensor


def num_perturbed(batch_size: int, perturb_ratio: float) -> int:
    """Positions perturbed per set: ``round(perturb_ratio * batch_size)``, halves rounded up."""
    return int(math.floor(perturb_ratio * batch_size + 0.5))


def nearest_neighbors(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of each sample's ``k`` nearest *other* samples in L2 distance.

    One ``B x B`` distance matrix and one top-k; a sample is never its own neighbour (its
    duplicates may be).
    """
    flat = features.detach().flatten(1).float()
    batch_size = flat.shape[0]
    if k >= batch_size:
        raise ValueError(f"a batch of {batch_size} samples has fewer than k={k} other samples")
    distances = torch.cdist(flat, flat)
    distances.fill_diagonal_(float("inf"))
    return distances.topk(k, dim=1, largest=False).indices


def neighbor_label_transfer(
    labels: torch.Tensor,
    neighbors: torch.Tensor,
    num_sets: int,
    perturb_ratio: float,
    generator: torch.Generator | None = None,
) -> SyntheticLabels:
    """Draw ``num_sets`` synthetic label sets from ``labels`` ``[B]`` and ``neighbors`` ``[B, k]``.

    In each set, ``num_perturbed(B, perturb_ratio)`` distinct positions (a random permutation's
    prefix) take the label of one of their k neighbours, chosen uniformly. ``generator`` must
    live on ``labels.device``.
    """
    batch_size, k = neighbors.shape
    device = labels.device
    count = num_perturbed(batch_size, perturb_ratio)
    # argsort of uniform noise is a random permutation per row: its first `count` entries
    # are distinct positions drawn without replacement.
    order = torch.rand(num_sets, batch_size, generator=generator, device=device).argsort(dim=1)
    chosen = order[:, :count]
    picks = torch.randint(k, (num_sets, count), generator=generator, device=device)
    donors = neighbors[chosen, picks]

    synthetic = labels.expand(num_sets, batch_size).clone()
    synthetic.scatter_(1, chosen, labels[donors])
    perturbed = torch.zeros(num_sets, batch_size, dtype=torch.bool, device=device)
    perturbed.scatter_(1, chosen, True)
    changed = (synthetic != labels).float().mean()
    return SyntheticLabels(synthetic, perturbed, neighbors, changed)
