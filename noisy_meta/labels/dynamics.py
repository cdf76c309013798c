"""Training-dynamics scores: each training sample's margin on its given label, averaged over training (AUM).

The area under the margin (Pleiss et al., "Identifying Mislabeled Data using the Area Under the
Margin Ranking", NeurIPS 2020): at every step a sample is trained on, its margin is the logit
of its given label minus the largest other logit. A correctly labelled sample's margin grows as
the network learns its class; a mislabelled one is pulled towards its given label only by
memorisation, against what the other samples of its true class teach, so its margin stays low
or negative for much of training. Averaged over the times each sample was seen, the margin
ranks the training set from most to least suspicious: it costs nothing beyond the forward that
training makes anyway.

`AreaUnderMargin` collects it from the training batches (`MetaNoiseWrapper.last_logits` after
`step`, or your own forward's logits), keeps its sums in a state dict (a resumed run continues
them exactly) and sums them over ranks when each process saw its own samples: what a process
saw since the last `AreaUnderMargin.all_reduce` is kept apart, so the call can come as often as
checkpoints are written (each one then holds the whole training set's sums on every rank).
It also keeps each sample's most recent predicted class, the label it suggests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logit[y] - max_{j != y} logit[j]`` per sample (``[B, C]`` logits, ``[B]`` labels), in float64."""
    logits = logits.detach().double()
    given = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -torch.inf)
    return given - others.max(dim=1).values


class AreaUnderMargin:
    """Each training sample's margin on its given label, averaged over the updates that saw it.

    Args:
        num_samples: N, the training set's size; samples are addressed by their index in
            ``[0, N)`` (the ``index`` column the command line's data sets carry).

    Feed it every training batch: ``aum.update(index, logits, labels)``. ``scores`` is the
    mean margin per sample (lower: more likely mislabelled; NaN: never seen); ``counts`` how
    many times each was seen.
    """

    def __init__(self, num_samples: int) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        #: Sums over every process up to the last `all_reduce` (all of them with one process).
        self.sums = torch.zeros(num_samples, dtype=torch.float64)
        self.counts = torch.zeros(num_samples, dtype=torch.int64)
        #: What this process added since (zero with one process after `all_reduce`).
        self._new_sums = torch.zeros(num_samples, dtype=torch.float64)
        self._new_counts = torch.zeros(num_samples, dtype=torch.int64)
        #: The class each sample was last predicted as (-1: never seen), and on which count of updates.
        self.predicted = torch.full((num_samples,), -1, dtype=torch.int64)

    @torch.no_grad()
    def update(self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch's margins: ``index`` ``[B]`` (the samples' positions), ``logits`` ``[B, C]``, ``labels``
        ``[B]`` (the given labels the loss trained on)."""
        if index.shape != labels.shape or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"index [B], logits [B, C] and labels [B] must agree, got {list(index.shape)}, "
                f"{list(logits.shape)} and {list(labels.shape)}"
            )
        index = index.detach().long().cpu()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.sums.numel()):
            found = f"[{int(index.min())}, {int(index.max())}]"
            raise ValueError(f"index must lie in [0, {self.sums.numel()}), got {found}")
        self._new_sums.index_add_(0, index, margins(logits, labels.long()).cpu())
        self._new_counts.index_add_(0, index, torch.ones_like(index))
        self.predicted[index] = logits.detach().argmax(dim=1).cpu()

    @property
    def counts_seen(self) -> torch.Tensor:
        """``[N]`` how many times each sample was seen (by this process since the last `all_reduce`, and by all
        processes before it)."""
        return self.counts + self._new_counts

    @property
    def scores(self) -> np.ndarray:
        """``[N]`` the mean margin on the given label (NaN for a sample never seen)."""
        counts = self.counts_seen.double()
        return torch.where(counts > 0, (self.sums + self._new_sums) / counts.clamp(min=1), torch.nan).numpy()

    def all_reduce(self, group: Any | None = None) -> None:
        """Add what every process saw since the last call to the sums (each process saw its own samples): every
        rank then holds the whole training set's scores and each sample's most recent prediction (for a sample
        that several processes saw since the last call, the largest class any of them predicted: the same on
        every rank). Call it on every rank, as often as wanted."""
        new_sums, new_counts, predicted = self._new_sums, self._new_counts, self.predicted
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            flat = torch.cat([new_sums, new_counts.double(), (predicted + 1).double() * (new_counts > 0)])
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            summed, largest = flat.to(device), flat.to(device).clone()
            dist.all_reduce(summed, group=group)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
            n = new_sums.numel()
            new_sums, new_counts = summed[:n].cpu(), summed[n : 2 * n].cpu().round().long()
            seen_here = largest[2 * n :].cpu().round().long() - 1
            predicted = torch.where(seen_here >= 0, seen_here, predicted)
        self.sums, self.counts, self.predicted = self.sums + new_sums, self.counts + new_counts, predicted
        self._new_sums, self._new_counts = torch.zeros_like(self._new_sums), torch.zeros_like(self._new_counts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums so far (this process's included: with several, call `all_reduce` first, so that every rank
        holds the same state) and the most recent predictions."""
        return {
            "sums": self.sums + self._new_sums,
            "counts": self.counts + self._new_counts,
            "predicted": self.predicted.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sums, counts = state["sums"], state["counts"]
        if sums.shape != self.sums.shape or counts.shape != self.counts.shape:
            raise ValueError(
                f"the state holds {sums.numel()} samples, this AreaUnderMargin {self.sums.numel()}: "
                "was it saved for another training set?"
            )
        self.sums, self.counts = sums.double().clone(), counts.long().clone()
        self._new_sums, self._new_counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        if "predicted" in state:
            self.predicted = state["predicted"].long().clone()
