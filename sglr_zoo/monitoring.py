"""What a run measures and records each epoch: clean and PGD accuracy per split (`monitor`), metrics.csv, the
curves and the console line."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from sglr_zoo.data import ImageSet, Splits, to_float
from sglr_zoo.evaluate import attack_correct
from sglr_zoo.files import write_atomic
from sglr_zoo.recipe import Recipe

SPLITS = ("train", "val", "test")  # the splits monitored each epoch (val only when data.val_size > 0)
# `steps`: the optimizer steps a row covers, fewer than an epoch's where run.max_steps stopped the run inside it (the
# row is replaced when the run continues) or where a budget's plan ends.
TRAIN_COLUMNS = ["epoch", "steps", "lr", "loss", "train_adv_acc", "grad_norm", "img_per_s", "epoch_s"]
MONITOR_COLUMN = re.compile(rf"({'|'.join(SPLITS)})_(clean|pgd\d+)_acc")
GUARD_COLUMN = re.compile(r"guard_(pgd\d+_acc|rollbacks)")  # the catastrophic-overfitting guard's (sglr_zoo.guard)


def monitor_attack(recipe: Recipe) -> str:
    """The evaluator's name of the per-epoch attack, e.g. "pgd10": it names the metric columns."""
    return f"pgd{recipe.eval.steps}"


def guard_columns(recipe: Recipe) -> list[str]:
    """The guard's metrics.csv columns when it runs: its latest check's PGD accuracy in the epoch (empty in an epoch
    without a check) and the rollbacks so far."""
    return [f"guard_pgd{recipe.guard.steps}_acc", "guard_rollbacks"] if recipe.guarded else []


def metric_columns(recipe: Recipe) -> list[str]:
    """metrics.csv's columns: training means, the guard's when it runs, then clean and PGD accuracy per split (e.g.
    `test_pgd10_acc`)."""
    return TRAIN_COLUMNS + guard_columns(recipe) + [f"{split}_{attack}_acc" for split in SPLITS
                                                    for attack in ("clean", monitor_attack(recipe))]


def monitor(model: nn.Module, splits: Splits, recipe: Recipe, accelerator: Accelerator) -> dict[str, float]:
    """Clean and PGD accuracy (%) on the first eval.n examples of each split, each process attacking its share.

    The evaluator's own measurement (`attack_correct`: fp32, eval mode, step eps/4, random start), so that
    `test_pgd10_acc` here and `pgd10` in a results.json are the same attack.
    """
    attack = monitor_attack(recipe)
    row = {}
    for split in SPLITS:
        data: ImageSet | None = getattr(splits, split)
        if data is None:
            continue
        n = min(recipe.eval.n, len(data))
        mine = torch.arange(accelerator.process_index, n, accelerator.num_processes)
        images, labels = to_float(data.images[mine], recipe.data.image_size), data.labels[mine]
        counts = [int(attack_correct(model, images, labels, attack=name, threat=recipe.attack.threat,
                                     eps=recipe.eval_eps, batch_size=recipe.eval.batch_size,
                                     device=accelerator.device).sum()) if len(mine) else 0
                  for name in ("clean", attack)]
        clean, robust = accelerator.reduce(torch.tensor(counts, device=accelerator.device), reduction="sum").tolist()
        row[f"{split}_clean_acc"], row[f"{split}_{attack}_acc"] = 100 * clean / n, 100 * robust / n
    return row


def write_metrics(path: Path, history: list[dict], columns: list[str]) -> None:
    """metrics.csv: `columns`, then any other column of the history (one monitored before a resume changed
    eval.steps)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys([*columns, *(key for row in history for key in row)])))
    writer.writeheader()
    writer.writerows(history)
    write_atomic(path, text.getvalue().encode())


def plot_curves(history: list[dict], path: Path, attack: str) -> None:
    """Train vs held-out robust accuracy and the gradient norm per epoch (the robust-overfitting diagnostic)."""
    from matplotlib.figure import Figure  # not pyplot: a notebook calling train() keeps its backend
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> tuple[list, list]:
        rows = [r for r in history if r.get(key) not in (None, "")]
        return [r["epoch"] for r in rows], [float(r[key]) for r in rows]

    fig = Figure(figsize=(10, 4))
    acc, grad = fig.subplots(1, 2)
    for key, label in [(f"{split}_{attack}_acc", f"{split} {attack.upper()}") for split in SPLITS] + [
            ("test_clean_acc", "test clean")]:
        epochs, values = series(key)
        if epochs:
            acc.plot(epochs, values, marker=".", label=label)
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if acc.lines:
        acc.legend()
    grad.plot(*series("grad_norm"), marker=".")
    grad.set(xlabel="epoch", ylabel="mean gradient norm", title="gradient norm of the training loss")
    last_epoch = max((r["epoch"] for r in history), default=1)
    for axes in (acc, grad):  # whole epochs, also for a run of one (matplotlib's own ticks: 0.96 ... 1.04)
        axes.set_xlim(0.5, last_epoch + 0.5)
        if last_epoch <= 10:
            axes.set_xticks(range(1, last_epoch + 1))
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_atomic(path, png.getvalue())


def flat_scalars(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The recipe as flat `section.key` scalars, as trackers' hyper-parameter tables want them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, bool)) else str(value)
    return flat


def format_row(row: dict, attack: str) -> str:
    def cell(key: str, width: int = 6) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value in (None, "") else f"{value:>{width}.2f}"

    accuracies = " | ".join(f"{split} {cell(f'{split}_clean_acc')} {cell(f'{split}_{attack}_acc')}" for split in SPLITS)
    return (f"epoch {row['epoch']:>4} | lr {row['lr']:.4f} | loss {row['loss']:.4f} | adv acc {cell('train_adv_acc')}"
            f" | grad {cell('grad_norm')} | {row['img_per_s']:>7.1f} img/s | clean/{attack}: {accuracies}")
