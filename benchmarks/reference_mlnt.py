"""The reference code's MLNT iteration, re-implemented on any timm model: the side-by-side anchor.

Written from ``../shared/reference/mlnt.md`` (what the authors' Clothing1M code does), with
its costs and quirks kept on purpose, because this is what `benchmarks/speed.py` compares
against, not something to train with:

- CE backward first, with ``retain_graph=True`` (the gradient waits in ``.grad``);
- mentor predictions in train mode;
- neighbours: for each perturbed sample of each synthetic set, its own squared-L2 distance
  row and one ``topk`` (a Python loop: ~M * rho * B top-k calls per iteration);
- second order: ``autograd.grad(..., create_graph=True)`` per set, all M graphs kept until
  one backward of ``w / M * sum_m J_m``;
- fast forwards through ``torch.func.functional_call`` with the *real* buffers, so BatchNorm
  running statistics are updated by every fast pass;
- ``KLDivLoss()`` (mean over batch and classes); one optimizer step; mentor EMA over
  parameters only.

The one change: models whose fused ops have no double backward (timm attention's fused
kernel, ``nn.Hardsigmoid``) are switched to twice-differentiable ones with
`noisy_meta.make_twice_differentiable`, as `MetaNoiseWrapper` does; the reference code's
ResNet-50 needs none.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from noisy_meta import make_twice_differentiable


class ReferenceMLNT:
    """One reference MLNT iteration per `step`; ``features`` is the frozen neighbour network."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        features: nn.Module,
        num_synthetic: int = 10,
        perturb_ratio: float = 0.5,
        num_neighbors: int = 10,
        inner_lr: float = 0.2,
        mentor_decay: float = 0.999,
    ) -> None:
        self.model, self.optimizer, self.features = model, optimizer, features.eval()
        self.mentor = copy.deepcopy(model).requires_grad_(False)
        make_twice_differentiable(model)
        self.num_synthetic, self.perturb_ratio, self.num_neighbors = num_synthetic, perturb_ratio, num_neighbors
        self.inner_lr, self.mentor_decay = inner_lr, mentor_decay

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, meta_weight: float = 1.0) -> float:
        model = self.model
        self.optimizer.zero_grad()
        outputs = model(inputs)
        ce = F.cross_entropy(outputs, targets)
        ce.backward(retain_graph=True)

        with torch.no_grad():
            self.mentor.train()
            mentor_probs = F.softmax(self.mentor(inputs), dim=1)
            features = self.features.forward_head(self.features.forward_features(inputs), pre_logits=True)

        names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        batch_size = inputs.shape[0]
        perturbed = int(self.perturb_ratio * batch_size)
        meta_sum = outputs.new_zeros(())
        for _ in range(self.num_synthetic):
            labels = targets.clone()
            for i in torch.randperm(batch_size)[:perturbed].tolist():
                distances = (features - features[i]).pow(2).sum(dim=1)
                neighbours = distances.topk(self.num_neighbors + 1, largest=False).indices[1:]
                labels[i] = targets[neighbours[torch.randint(self.num_neighbors, (1,)).item()]]
            grads = torch.autograd.grad(F.cross_entropy(outputs, labels), params, create_graph=True)
            fast = {name: p - self.inner_lr * g for name, p, g in zip(names, params, grads)}
            fast_outputs = functional_call(model, fast, (inputs,))  # real buffers: BN stats move
            meta_sum = meta_sum + F.kl_div(F.log_softmax(fast_outputs, dim=1), mentor_probs, reduction="mean")
        (meta_sum * meta_weight / self.num_synthetic).backward()
        self.optimizer.step()

        with torch.no_grad():
            for mentor_param, param in zip(self.mentor.parameters(), model.parameters()):
                mentor_param.mul_(self.mentor_decay).add_(param, alpha=1 - self.mentor_decay)
        return float(ce.detach() + meta_weight * meta_sum.detach() / self.num_synthetic)
