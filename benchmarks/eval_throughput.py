"""PGD-20 evaluation: our attack against torchattacks' PGD on the same model and images, in the same run.

Both run in fp32 with the model in eval mode (eps 8/255, step 2/255, 20 steps, random start) over the first n
test images; the script prints images/s, robust accuracy and the ratio.

    python benchmarks/eval_throughput.py runs/quickstart_cifar10/last --n 500
"""

from __future__ import annotations

import argparse
import time

import torch
import torchattacks

import sglr_zoo
from sglr_zoo.attacks import pgd
from sglr_zoo.data import load_splits, to_float
from sglr_zoo.recipe import DataConfig


def timed_accuracy(model: torch.nn.Module, attack, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int) -> tuple[float, float]:
    """(images/s, robust accuracy %) of `attack(x, y) -> x_adv` followed by a prediction, over all batches."""
    correct, started = 0, time.perf_counter()
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x_adv = attack(x, y)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y).sum())
    seconds = time.perf_counter() - started
    return len(labels) / seconds, 100 * correct / len(labels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="anything sglr_zoo.load accepts")
    parser.add_argument("--dataset", default="uoft-cs/cifar10")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()

    model = sglr_zoo.load(args.model)
    test = load_splits(DataConfig(dataset=args.dataset, n_train=1, n_test=args.n)).test
    images, labels = to_float(test.images, 32), test.labels
    eps, step = 8 / 255, 2 / 255
    reference = torchattacks.PGD(model, eps=eps, alpha=step, steps=20, random_start=True)
    ours = lambda x, y: pgd(model, x, y, eps=eps, step_size=step, steps=20)  # noqa: E731
    rows = []
    for name, attack in [("torchattacks", reference), ("sglr_zoo", ours)] * 2:  # interleaved, best of 2 each
        torch.manual_seed(0)
        rows.append((name, *timed_accuracy(model, attack, images, labels, args.batch_size)))
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, n {args.n}")
    print(f"{'attack':<14}{'img/s':>9}{'PGD-20 acc %':>14}")
    for name, speed, accuracy in rows:
        print(f"{name:<14}{speed:>9.1f}{accuracy:>14.2f}")
    ours = max(r[1] for r in rows if r[0] == "sglr_zoo")
    theirs = max(r[1] for r in rows if r[0] == "torchattacks")
    print(f"ratio sglr_zoo / torchattacks (best of 2 each): {ours / theirs:.2f}")
