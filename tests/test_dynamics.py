"""`AreaUnderMargin`: the margins by hand, a run with mislabelled samples, resume, the sum over two ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisy_meta import AreaUnderMargin, inject_noise

from helpers import make_wrapper, tiny_resnet


def test_the_margin_is_the_given_logit_minus_the_largest_other():
    aum = AreaUnderMargin(4)
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    aum.update(torch.tensor([3, 0]), logits, torch.tensor([0, 2]))
    aum.update(torch.tensor([3]), torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([0]))
    expected = [1.0 - 3.0, np.nan, np.nan, ((2.0 - 1.0) + (0.0 - 1.0)) / 2]  # sample 0: label 2 -> 1 - 3
    np.testing.assert_allclose(aum.scores, expected)
    assert aum.counts_seen.tolist() == [1, 0, 0, 2]
    assert aum.predicted.tolist() == [1, -1, -1, 1]  # the class each was last predicted as (-1: never seen)


def test_mislabelled_samples_have_the_lowest_area_under_the_margin():
    """A real run on digits with 30% symmetric noise, fed from the wrapper's logits at no extra forward."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:512], dtype=torch.float32).unsqueeze(1) / 16.0
    clean = digits.target[:512]
    noisy = torch.tensor(inject_noise(clean, 10, "symmetric", 0.3, seed=0).labels)
    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10, in_chans=1)
    wrapper = make_wrapper(model, num_synthetic=1, first_order=True, meta_every=4)
    aum = AreaUnderMargin(len(noisy))
    for _ in range(6):
        order = torch.randperm(len(noisy))
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            wrapper.step(images[index], noisy[index])
            aum.update(index, wrapper.last_logits, noisy[index])
    wrong = noisy.numpy() != clean
    ranked = np.argsort(aum.scores)  # most suspicious first
    top = ranked[: int(wrong.sum())]
    assert wrong[top].mean() > 0.7  # precision at the number of mislabelled samples (chance: 0.3)


def test_the_state_dict_resumes_exactly_and_refuses_another_training_set():
    aum, resumed = AreaUnderMargin(5), AreaUnderMargin(5)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        batches.append((torch.randint(0, 5, (3,), generator=generator), torch.randn(3, 4, generator=generator)))
    for index, logits in batches[:2]:
        aum.update(index, logits, index % 4)
    resumed.load_state_dict(aum.state_dict())
    for index, logits in batches[2:]:
        aum.update(index, logits, index % 4)
        resumed.update(index, logits, index % 4)
    np.testing.assert_array_equal(aum.scores, resumed.scores)
    with pytest.raises(ValueError, match="saved for another training set"):
        AreaUnderMargin(6).load_state_dict(aum.state_dict())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        AreaUnderMargin(0)
    aum = AreaUnderMargin(3)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 3\)"):
        aum.update(torch.tensor([3]), torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="must agree"):
        aum.update(torch.tensor([0, 1]), torch.zeros(1, 2), torch.tensor([0]))


def _two_ranks(rank: int, path: str, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    aum = AreaUnderMargin(4)
    sample_2 = [[3.0, 2.0], [0.0, 4.0]][rank]  # rank 0 predicts class 0, rank 1 class 1
    aum.update(torch.tensor([rank, 2]), torch.tensor([[1.0, 0.0], sample_2]), torch.tensor([0, 1]))
    aum.all_reduce()
    if rank == 1:  # after a checkpoint's all-reduce, more training: only what is new is summed next time
        aum.update(torch.tensor([3]), torch.tensor([[0.5, 0.0]]), torch.tensor([1]))
    aum.all_reduce()
    if rank == 0:
        torch.save(aum.state_dict(), result)
    dist.destroy_process_group()


def test_all_reduce_sums_what_each_rank_saw(tmp_path):
    """Rank 0 saw samples 0 and 2, rank 1 samples 1 and 2: every rank ends with the whole set's sums."""
    import torch.multiprocessing as mp

    result = str(tmp_path / "state.pt")
    mp.spawn(_two_ranks, args=(str(tmp_path / "rendezvous"), result), nprocs=2)
    state = torch.load(result)
    assert state["counts"].tolist() == [1, 1, 2, 1]
    torch.testing.assert_close(state["sums"], torch.tensor([1.0, 1.0, -1.0 + 4.0, -0.5], dtype=torch.float64))
    assert state["predicted"].tolist() == [0, 0, 1, 0]  # sample 2, seen by both: the larger class
