"""Neighbour label transfer against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from noisy_meta import nearest_neighbors, neighbor_label_transfer, num_perturbed


def brute_force_neighbors(features: torch.Tensor, k: int) -> list[set[int]]:
    out = []
    for i in range(features.shape[0]):
        dist = [((features[i] - features[j]) ** 2).sum().item() if j != i else math.inf for j in range(len(features))]
        out.append(set(sorted(range(len(features)), key=lambda j: dist[j])[:k]))
    return out


def test_nearest_neighbors_match_brute_force_and_exclude_self():
    features = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    neighbors = nearest_neighbors(features, 5)
    assert neighbors.shape == (20, 5)
    for i, expected in enumerate(brute_force_neighbors(features, 5)):
        assert set(neighbors[i].tolist()) == expected
        assert i not in neighbors[i].tolist()


def test_nearest_neighbors_needs_enough_samples():
    with pytest.raises(ValueError, match="fewer than k=4"):
        nearest_neighbors(torch.randn(4, 3), 4)


@pytest.mark.parametrize("batch_size,ratio", [(20, 0.5), (17, 0.5), (9, 0.3), (10, 1.0), (5, 0.1)])
def test_transfer_changes_only_chosen_positions_to_neighbour_labels(batch_size, ratio):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(batch_size, 4, generator=generator)
    labels = torch.randint(0, 5, (batch_size,), generator=generator)
    k = 3
    true_neighbors = brute_force_neighbors(features, k)
    result = neighbor_label_transfer(labels, nearest_neighbors(features, k), 6, ratio, generator)

    assert result.labels.shape == (6, batch_size) and result.labels.dtype == torch.long
    expected_count = math.floor(ratio * batch_size + 0.5)
    assert result.perturbed.sum(dim=1).tolist() == [expected_count] * 6
    assert expected_count == num_perturbed(batch_size, ratio)
    for m in range(6):
        for i in range(batch_size):
            new = result.labels[m, i].item()
            if not result.perturbed[m, i]:
                assert new == labels[i].item()
            else:
                assert new in {labels[j].item() for j in true_neighbors[i]}
    changed = (result.labels != labels).float().mean()
    assert result.changed_fraction.item() == pytest.approx(changed.item())


def test_transfer_picks_every_neighbour_eventually():
    # Distinct labels, so the label identifies the neighbour it came from.
    features = torch.arange(10.0).unsqueeze(1)
    labels = torch.arange(10)
    result = neighbor_label_transfer(labels, nearest_neighbors(features, 2), 200, 1.0, torch.Generator().manual_seed(0))
    assert set(result.labels[:, 5].tolist()) == {4, 6}
    assert set(result.labels[:, 0].tolist()) == {1, 2}


def test_same_seed_same_labels_and_other_seed_differs():
    features = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    neighbors = nearest_neighbors(features, 10)

    def draw(seed):
        return neighbor_label_transfer(labels, neighbors, 10, 0.5, torch.Generator().manual_seed(seed)).labels

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
