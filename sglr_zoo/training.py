"""Adversarial training on Accelerate, one linear loop: data -> model -> objective -> optimizer -> prepare -> epochs.

Run it with `sglr-zoo train RECIPE` or `accelerate launch train.py RECIPE`. The run directory gets the resolved
recipe, `run.json`, `metrics.csv`, `curves.png`, atomic per-epoch checkpoints (`checkpoints/epoch_NNNN`,
resumed with `run.resume: auto`), and `best/` (by validation PGD accuracy) and `last/` model exports.
"""

from __future__ import annotations

import csv
import ctypes
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

import sglr_zoo
from sglr_zoo.attacks import pgd
from sglr_zoo.data import ImageSet, IndexedDataset, Splits, augment, load_splits, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import evaluate, format_results, save_results
from sglr_zoo.models import create_model, load_pretrained, save_pretrained
from sglr_zoo.objectives import build_objective
from sglr_zoo.recipe import Recipe, ScheduleConfig, save_recipe
from sglr_zoo.zoo import locate

COLUMNS = ["epoch", "lr", "loss", "train_adv_acc", "grad_norm", "img_per_s", "epoch_s",
           "train_clean_acc", "train_pgd_acc", "val_clean_acc", "val_pgd_acc", "test_clean_acc", "test_pgd_acc"]


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RunState:
    """Epoch counter, best validation accuracy and the metrics history: saved with every checkpoint."""

    def __init__(self) -> None:
        self.epoch, self.best_epoch, self.best_val_pgd, self.history = 0, 0, -1.0, []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "best_epoch": self.best_epoch, "best_val_pgd": self.best_val_pgd,
                "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.best_epoch, self.best_val_pgd = int(state["epoch"]), int(state["best_epoch"]), float(
            state["best_val_pgd"])
        self.history = json.loads(state["history"])


def lr_factor(cfg: ScheduleConfig, epoch_progress: float) -> float:
    """Learning-rate multiplier at a fractional epoch (0 = start of training), per batch."""
    if cfg.warmup_epochs and epoch_progress < cfg.warmup_epochs:
        return epoch_progress / cfg.warmup_epochs
    t = (epoch_progress - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
    if cfg.name == "multistep":  # as in the authors' code: lr * gamma from (1-based) epoch m on
        return cfg.gamma ** sum(int(epoch_progress) + 1 >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "onecycle":
        return t / cfg.peak_at if t < cfg.peak_at else max(0.0, (1 - t) / (1 - cfg.peak_at))
    return 1.0


def keep_freed_memory() -> None:
    """glibc only: keep freed memory in the process (no trimming, mmap only above 32 MiB).

    CPU training allocates and frees the same large activations every step; returning them to the OS costs
    page faults. This is what MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_/MALLOC_MMAP_THRESHOLD_ do, set at run time:
    +10-20% images/s on a 2-core CPU (benchmarks/RESULTS.md).
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_trim_threshold, 2**31 - 1), (m_top_pad, 1 << 30), (m_mmap_threshold, 1 << 25)):
        libc.mallopt(option, value)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _check_hardware(recipe: Recipe, accelerator: Accelerator) -> None:
    if accelerator.device.type == "cpu":
        if accelerator.mixed_precision == "fp16":
            raise UserError("run.mixed_precision: fp16 needs a GPU; on a CPU use bf16 or no")
        if recipe.run.sync_batchnorm and accelerator.num_processes > 1:
            raise UserError("run.sync_batchnorm: SyncBatchNorm needs GPUs; set it to false on CPU")
    if recipe.run.batch_size % accelerator.num_processes:
        raise UserError(f"run.batch_size: {recipe.run.batch_size} is not divisible by the "
                        f"{accelerator.num_processes} processes")


@torch.no_grad()
def _count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(1) == y).sum())


def monitor_accuracy(model: nn.Module, data: ImageSet, recipe: Recipe, accelerator: Accelerator) -> tuple[float, float]:
    """Clean and PGD accuracy (%) on the first eval.n examples, fp32, eval mode, sharded over processes."""
    n = min(recipe.eval.n, len(data))
    mine = torch.arange(accelerator.process_index, n, accelerator.num_processes)
    attack = recipe.attack
    clean = robust = 0
    model.eval()
    for batch in mine.split(recipe.eval.batch_size):
        x = to_float(data.images[batch], recipe.data.image_size).to(accelerator.device)
        y = data.labels[batch].to(accelerator.device)
        clean += _count_correct(model, x, y)
        x_adv = pgd(model, x, y, threat=attack.threat, eps=float(attack.eps), step_size=float(attack.step_size),
                    steps=recipe.eval.steps, random_start=attack.random_start)
        robust += _count_correct(model, x_adv, y)
    counts = accelerator.reduce(torch.tensor([clean, robust], device=accelerator.device), reduction="sum")
    return 100 * counts[0].item() / n, 100 * counts[1].item() / n


def replica_checksums(accelerator: Accelerator, *modules: nn.Module) -> list[float]:
    """A checksum of each module's parameters and buffers (the SGLR bank included) from every process."""
    local = torch.stack([sum((t.double().sum() for t in m.state_dict().values() if t.is_floating_point()),
                             torch.zeros((), dtype=torch.float64)).to(accelerator.device) for m in modules])
    return accelerator.gather(local[None]).view(-1, len(modules)).tolist()


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (half-written ones are never named epoch_NNNN)."""
    done = sorted(folder.glob("epoch_[0-9][0-9][0-9][0-9]")) if folder.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(accelerator: Accelerator, folder: Path, epoch: int, keep: int) -> None:
    """Writes into a temporary folder, then renames it: a crash mid-write never breaks the latest checkpoint."""
    final = folder / f"epoch_{epoch:04d}"
    partial = folder / f".partial_epoch_{epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in sorted(folder.glob("epoch_[0-9][0-9][0-9][0-9]"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    partial = run_dir / "metrics.csv.partial"
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(partial, run_dir / "metrics.csv")


def plot_curves(history: list[dict], path: Path) -> None:
    """Train vs held-out robust accuracy and the gradient norm per epoch (the robust-overfitting diagnostic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list, list]:
        rows = [r for r in history if r.get(key) not in (None, "")]
        return [r["epoch"] for r in rows], [float(r[key]) for r in rows]

    fig, (acc, grad) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in [("train_pgd_acc", "train PGD"), ("val_pgd_acc", "val PGD"), ("test_pgd_acc", "test PGD"),
                       ("test_clean_acc", "test clean")]:
        epochs, values = series(key)
        if epochs:
            acc.plot(epochs, values, marker=".", label=label)
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if acc.lines:
        acc.legend()
    grad.plot(*series("grad_norm"), marker=".")
    grad.set(xlabel="epoch", ylabel="mean gradient norm", title="gradient norm of the training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _flat(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The recipe as flat `section.key` scalars, as trackers' hyper-parameter tables want them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, bool)) else str(value)
    return flat


def _format_row(row: dict) -> str:
    def cell(key: str, width: int = 6) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value in (None, "") else f"{value:>{width}.2f}"

    return (f"epoch {row['epoch']:>4} | lr {row['lr']:.4f} | loss {row['loss']:.4f} | adv acc {cell('train_adv_acc')}"
            f" | grad {cell('grad_norm')} | {row['img_per_s']:>7.1f} img/s | train clean/pgd {cell('train_clean_acc')}"
            f" {cell('train_pgd_acc')} | val {cell('val_clean_acc')} {cell('val_pgd_acc')}"
            f" | test {cell('test_clean_acc')} {cell('test_pgd_acc')}")


def final_evaluation(folder: Path, splits: Splits, recipe: Recipe, device: torch.device, command: str) -> dict:
    """Evaluates an exported model (reloaded from its folder, fp32) on the first eval.final_n test examples and
    writes `results.json` next to its weights: the numbers model cards show."""
    n = min(recipe.eval.final_n, len(splits.test))
    model = load_pretrained(f"local-dir:{folder}").to(device)
    results = evaluate(model, to_float(splits.test.images[:n], recipe.data.image_size), splits.test.labels[:n],
                       threat=recipe.attack.threat, eps=recipe.attack.eps, attacks=recipe.eval.final_attacks,
                       batch_size=recipe.eval.batch_size, seed=recipe.run.seed, num_classes=splits.num_classes,
                       device=device, progress=True, model_name=str(folder), dataset=recipe.data.dataset,
                       split=recipe.data.test_split, source=splits.source,
                       which=f"first {n} of the {recipe.data.test_split} split, in order", command=command)
    save_results(results, folder / "results.json")
    print(f"{folder.name}: {format_results(results)}")
    return results


def train(recipe: Recipe, *, command: str = "") -> Path:
    """Trains the recipe's model and returns the run directory."""
    keep_freed_memory()
    run_dir = Path(recipe.run.output_dir) / (recipe.run.name or "run")
    # Under torchrun on a machine without GPUs, accelerate goes multi-process (gloo) only with cpu=True; without it
    # every process would train alone, all writing the same run directory.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(mixed_precision=recipe.run.mixed_precision, cpu=multi_cpu,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(run_dir),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    _check_hardware(recipe, accelerator)
    set_seed(recipe.run.seed)

    splits = load_splits(recipe.data)
    per_process_batch = recipe.run.batch_size // accelerator.num_processes
    train_loader = torch.utils.data.DataLoader(IndexedDataset(splits.train), batch_size=per_process_batch, shuffle=True,
                                               num_workers=recipe.run.num_workers)

    pretrained = locate(recipe.model.pretrained) if recipe.model.pretrained else None
    model = create_model(recipe.model.arch, splits.num_classes, mean=recipe.model.mean, std=recipe.model.std,
                         drop_rate=recipe.model.drop_rate, pretrained=pretrained, **recipe.model.kwargs)
    if recipe.run.sync_batchnorm and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if recipe.run.channels_last else torch.contiguous_format
    model = model.to(accelerator.device, memory_format=memory_format)
    objective = build_objective(recipe.method, labels=splits.train.labels, num_classes=splits.num_classes,
                                start_epoch=recipe.start_epoch, model=model).to(accelerator.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.optim.lr, momentum=recipe.optim.momentum,
                                weight_decay=recipe.optim.weight_decay, nesterov=recipe.optim.nesterov)
    plain_model = model  # uncompiled, sharing the parameters: what checkpoints export
    if recipe.run.compile:
        model = torch.compile(model)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Autocast is applied explicitly below, so that the monitoring attacks run in fp32.
    raw_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    state = RunState()
    accelerator.register_for_checkpointing(objective, state)

    checkpoints = run_dir / "checkpoints"
    resume_from = None
    if recipe.run.resume == "auto":
        resume_from = latest_checkpoint(checkpoints)
    elif recipe.run.resume != "never":
        resume_from = Path(recipe.run.resume)
        if not resume_from.is_dir():
            raise UserError(f"run.resume: checkpoint folder {resume_from} not found; use auto, never or a folder")
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch})")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")

    accelerator.init_trackers("tensorboard", config=_flat(recipe.to_dict()))
    steps_per_epoch = len(train_loader)
    attack = recipe.attack
    global_step = state.epoch * steps_per_epoch
    for epoch in range(state.epoch + 1, recipe.schedule.epochs + 1):
        train_loader.set_epoch(epoch)
        model.train()
        sums = torch.zeros(4, device=accelerator.device)  # loss * n, adversarial correct, grad norm, n
        started = time.perf_counter()
        progress = tqdm(train_loader, desc=f"epoch {epoch}/{recipe.schedule.epochs}", leave=False,
                        disable=not accelerator.is_local_main_process)
        for step, (images, labels, index) in enumerate(progress):
            lr = recipe.optim.lr * lr_factor(recipe.schedule, (epoch - 1) + step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = to_float(images, recipe.data.image_size)
            x = augment(x) if recipe.data.augment else x
            x = x.contiguous(memory_format=memory_format)
            with accelerator.autocast():
                x_adv = pgd(raw_model, x, labels, threat=attack.threat, eps=float(attack.eps),
                            step_size=float(attack.step_size), steps=attack.steps, random_start=attack.random_start,
                            loss=objective.attack_loss, mode=attack.model_mode)
                out = objective(model, x, x_adv, labels, index, epoch)
            loss = out["loss"]
            if not torch.isfinite(loss) and accelerator.mixed_precision != "fp16":
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {step + 1}; nothing was saved "
                                       f"for this epoch. Lower optim.lr or set optim.grad_clip, then resume")
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if "bank_index" in out:
                objective.write_bank(accelerator.gather_for_metrics(out["bank_index"]),
                                     accelerator.gather_for_metrics(out["bank_targets"]))
            if hasattr(objective, "update_teacher"):
                objective.update_teacher(raw_model)
            n = len(labels)
            sums += torch.stack([loss.detach().float() * n, (out["logits"].argmax(1) == labels).sum().float(),
                                 torch.as_tensor(grad_norm, device=accelerator.device).float(),
                                 torch.tensor(float(n), device=accelerator.device)])
            global_step += 1
            if recipe.run.max_steps and global_step >= recipe.run.max_steps:
                break
        epoch_seconds = time.perf_counter() - started
        sums = accelerator.reduce(sums, reduction="sum")
        steps_done = step + 1
        row = {"epoch": epoch, "lr": lr, "loss": (sums[0] / sums[3]).item(),
               "train_adv_acc": 100 * (sums[1] / sums[3]).item(),
               "grad_norm": (sums[2] / accelerator.num_processes / steps_done).item(),
               "img_per_s": sums[3].item() / epoch_seconds, "epoch_s": epoch_seconds}
        last_epoch = epoch == recipe.schedule.epochs or bool(recipe.run.max_steps and global_step >= recipe.run.max_steps)
        if epoch % recipe.eval.every == 0 or last_epoch:
            row["train_clean_acc"], row["train_pgd_acc"] = monitor_accuracy(raw_model, splits.train, recipe, accelerator)
            if splits.val is not None:
                row["val_clean_acc"], row["val_pgd_acc"] = monitor_accuracy(raw_model, splits.val, recipe, accelerator)
            row["test_clean_acc"], row["test_pgd_acc"] = monitor_accuracy(raw_model, splits.test, recipe, accelerator)
        state.epoch = epoch
        state.history.append(row)
        accelerator.print(_format_row(row))
        accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

        if splits.val is not None and row.get("val_pgd_acc", -1) > state.best_val_pgd:
            state.best_val_pgd, state.best_epoch = row["val_pgd_acc"], epoch
            if accelerator.is_main_process:
                save_pretrained(plain_model, run_dir / "best", label_names=splits.train.class_names)
        if accelerator.is_main_process:
            _write_metrics(run_dir, state.history)
            plot_curves(state.history, run_dir / "curves.png")
        if epoch % recipe.run.checkpoint_every == 0 or last_epoch:
            save_checkpoint(accelerator, checkpoints, epoch, recipe.run.keep_checkpoints)
        if last_epoch:
            break

    checksums = replica_checksums(accelerator, plain_model, objective)
    if any(row != checksums[0] for row in checksums):
        raise RuntimeError(f"processes ended with different weights or soft labels: {checksums}")
    if accelerator.is_main_process:
        save_pretrained(plain_model, run_dir / "last", label_names=splits.train.class_names)
        run_info = {"sglr_zoo_version": sglr_zoo.__version__, "git_commit": _git_commit(), "command": command,
                    "seed": recipe.run.seed, "last_epoch": state.epoch, "best_epoch": state.best_epoch or None,
                    "best_val_pgd_acc": state.best_val_pgd if state.best_epoch else None,
                    "num_processes": accelerator.num_processes, "replica_checksums": checksums, "mixed_precision": accelerator.mixed_precision,
                    "class_names": splits.train.class_names, "num_examples_train": len(splits.train),
                    "data_source": splits.source}
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2))
        for export in ("best", "last"):
            if (run_dir / export / "config.json").is_file():
                final_evaluation(run_dir / export, splits, recipe, accelerator.device, command)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
