"""PGD-20 evaluation: ours against torchattacks' PGD on the same model and images, in the same run.

All run in fp32 with the model in eval mode (eps 8/255, step 2/255, 20 steps, random start) over the first n test
images; the script prints images/s, robust accuracy and the ratio to torchattacks. Rows: `torchattacks`;
`pgd` (sglr_zoo.attacks.pgd, parameters frozen during the attack: the default), `pgd unfrozen` (freeze=False),
`pgd channels_last` (model and images in channels_last), and `evaluator` (sglr_zoo.evaluate.attack_correct, what
`sglr-zoo eval` and the trainer's monitoring run: PGD on the clean-correct images only). Interleaved, best of 2.

    python benchmarks/eval_throughput.py runs/quickstart_cifar10/last --n 500
    python benchmarks/eval_throughput.py preactresnet10_slim_cifar --n 500    # untrained weights: speed only
"""

from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
import torchattacks
from train_throughput import cpu_label

import sglr_zoo
from sglr_zoo.attacks import pgd
from sglr_zoo.data import load_splits, to_float
from sglr_zoo.evaluate import attack_correct
from sglr_zoo.models import create_model
from sglr_zoo.recipe import DataConfig

EPS, STEP = 8 / 255, 2 / 255


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


def timed_evaluator(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    batch_size: int) -> tuple[float, float]:
    started = time.perf_counter()
    robust = attack_correct(model, images, labels, attack="pgd20", eps="8/255", batch_size=batch_size)
    return len(labels) / (time.perf_counter() - started), 100 * robust.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="anything sglr_zoo.load accepts, or a timm architecture (untrained weights)")
    parser.add_argument("--dataset", default="uoft-cs/cifar10")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()

    if timm.is_model(args.model):
        torch.manual_seed(0)
        model = create_model(args.model, 10).eval()
    else:
        model = sglr_zoo.load(args.model)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    test = load_splits(DataConfig(dataset=args.dataset, n_train=1, n_test=args.n)).test
    images, labels = to_float(test.images, 32), test.labels
    attacks = {
        "torchattacks": (model, torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=20, random_start=True)),
        "pgd": (model, lambda x, y: pgd(model, x, y, eps=EPS, step_size=STEP, steps=20)),
        "pgd unfrozen": (model, lambda x, y: pgd(model, x, y, eps=EPS, step_size=STEP, steps=20, freeze=False)),
        "pgd channels_last": (model_cl, lambda x, y: pgd(
            model_cl, x.contiguous(memory_format=torch.channels_last), y, eps=EPS, step_size=STEP, steps=20)),
    }
    rows: dict[str, tuple[float, float]] = {}
    for _ in range(2):  # interleaved, best of 2 each
        for name, (net, attack) in [*attacks.items(), ("evaluator", (model, None))]:
            torch.manual_seed(0)
            if attack is None:
                speed, accuracy = timed_evaluator(net, images, labels, args.batch_size)
            else:
                speed, accuracy = timed_accuracy(net, attack, images, labels, args.batch_size)
            if name not in rows or speed > rows[name][0]:
                rows[name] = (speed, accuracy)
    print(f"# {cpu_label()}\n# torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, "
          f"n {args.n}, batch {args.batch_size}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'attack':<20}{'img/s':>9}{'PGD-20 acc %':>14}{'x torchattacks':>16}")
    for name, (speed, accuracy) in rows.items():
        print(f"{name:<20}{speed:>9.1f}{accuracy:>14.2f}{speed / rows['torchattacks'][0]:>16.2f}")


if __name__ == "__main__":
    main()
