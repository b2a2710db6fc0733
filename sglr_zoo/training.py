"""Adversarial training on Accelerate, one linear loop: data -> model -> objective -> optimizer -> prepare -> epochs.

Run it with `sglr-zoo train RECIPE` or `accelerate launch train.py RECIPE`. The run directory gets the resolved
recipe, `run.json`, `metrics.csv`, `curves.png`, atomic per-epoch checkpoints (`checkpoints/epoch_NNNN`,
resumed with `run.resume: auto`), and `best/` (by validation PGD accuracy) and `last/` model exports. After the
last epoch the exports and run.json are written, the process group ends, and the main process alone evaluates
the exports (`results.json` beside each), so a long AutoAttack never runs into the process group's timeout.

A run that `run.max_steps` stops inside an epoch is checkpointed there, with its position in the epoch; continuing
it trains exactly the remaining steps, bit for bit as an uninterrupted run: an epoch's data order depends on the
seed and the epoch alone (accelerate's seedable sampler, with its own generator), and monitoring draws no random
number that training would.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, broadcast, broadcast_object_list, set_seed
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

import sglr_zoo
from sglr_zoo import finetune, hardware
from sglr_zoo.attacks import pgd
from sglr_zoo.checkpoint import STATE, Checkpointer, finish_run, open_run
from sglr_zoo.data import ImageSet, IndexedDataset, Splits, augment, load_splits, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import attack_correct, evaluate, for_evaluation
from sglr_zoo.files import WriteFailed, refuse_link, write_atomic
from sglr_zoo.models import load_pretrained, save_pretrained
from sglr_zoo.objectives import SGLR, Objective, build_objective
from sglr_zoo.recipe import Recipe, ScheduleConfig, from_dict, load_recipe, save_recipe
from sglr_zoo.results import Provenance, Results, public_paths
from sglr_zoo.rundir import ModelFolder, RunDir
from sglr_zoo.schedule import epoch_progress, parse_budget, plan_budget

SPLITS = ("train", "val", "test")  # the splits monitored each epoch (val only when data.val_size > 0)
# `steps`: the optimizer steps a row covers, fewer than an epoch's where run.max_steps stopped the run inside it (the
# row is replaced when the run continues) or where a budget's plan ends.
TRAIN_COLUMNS = ["epoch", "steps", "lr", "loss", "train_adv_acc", "grad_norm", "img_per_s", "epoch_s"]
MONITOR_COLUMN = re.compile(rf"({'|'.join(SPLITS)})_(clean|pgd\d+)_acc")
SUMS = ("loss", "adv_correct", "grad_norm", "examples", "steps")  # an epoch's training sums, over all processes
# The evaluator's sanity checks on an export, in fp32 forward-backward passes of one image: PGD-20 at a large
# eps and the input gradients, on up to 100 examples (sglr_zoo.evaluate); a budget reserves time for them.
FINAL_SANITY_PASSES = 100 * 23
TIMEOUT_ENV = "SGLR_ZOO_PROCESS_GROUP_TIMEOUT"  # seconds a process waits in a collective (torch's default if unset)
REPLAN_EVERY = 0.1  # a budgeted run plans the rest again, from its own speed, after each such fraction of its first plan


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RunState:
    """Where the run is: the last epoch trained in, whole or up to `epoch_step` where run.max_steps stopped the run
    inside it (with the sums of those steps, `epoch_sums`), the optimizer steps since the start of the run (across
    resumes: what run.max_steps counts), the best validation epoch, the metrics history and the training data's
    fingerprint. Saved as JSON with every checkpoint."""

    def __init__(self) -> None:
        self.epoch, self.epoch_step, self.global_step, self.best_epoch, self.best_val_pgd = 0, 0, 0, 0, -1.0
        self.epoch_sums: dict[str, float] = {}
        self.history: list[dict] = []
        self.data_sha256: str | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "epoch_sums": self.epoch_sums,
                "global_step": self.global_step, "best_epoch": self.best_epoch, "best_val_pgd": self.best_val_pgd,
                "history": self.history, "data_sha256": self.data_sha256}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`'s output; raises ValueError naming the first value that is not what it must be:
        the history goes into metrics.csv, so its rows hold finite numbers under metric column names, nothing else."""
        state = {"epoch_step": 0, "epoch_sums": {}, "data_sha256": None, **state}  # what an older checkpoint lacks
        for key in ("epoch", "epoch_step", "global_step", "best_epoch"):
            _check(key, state[key], _is_count(state[key]), "a count")
        _check("best_val_pgd", state["best_val_pgd"], _is_number(state["best_val_pgd"]), "a finite number")
        sha256, sums, history = state["data_sha256"], state["epoch_sums"], state["history"]
        _check("data_sha256", sha256, sha256 is None or isinstance(sha256, str)
               and re.fullmatch(r"[0-9a-f]{64}", sha256) is not None, "a sha256")
        _check("epoch_sums", sums, isinstance(sums, dict) and set(sums) <= {*SUMS, "seconds"}
               and all(map(_is_number, sums.values())), f"finite numbers named {', '.join(SUMS)} or seconds")
        _check("history", history, isinstance(history, list), "a list of rows")
        for number, row in enumerate(history, 1):
            _check(f"history row {number}", row, isinstance(row, dict) and _is_count(row.get("epoch")),
                   "a row with an epoch")
            for key, value in row.items():
                _check(f"history row {number}'s column", key, key in TRAIN_COLUMNS
                       or MONITOR_COLUMN.fullmatch(key) is not None, "a metrics.csv column")
                _check(f"history row {number}'s {key}", value, _is_number(value), "a finite number")
        self.epoch, self.epoch_step, self.global_step = state["epoch"], state["epoch_step"], state["global_step"]
        self.best_epoch, self.best_val_pgd = state["best_epoch"], float(state["best_val_pgd"])
        self.epoch_sums, self.history, self.data_sha256 = dict(sums), list(history), sha256


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _is_number(value: object) -> bool:
    """A finite int or float; an int too large for a float is none (it could not be plotted)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def _check(name: str, value: object, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{STATE}: {name} is {value!r:.60}, not {what}")  # the checkpointer names the checkpoint


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


def monitor_attack(recipe: Recipe) -> str:
    """The evaluator's name of the per-epoch attack, e.g. "pgd10": it names the metric columns."""
    return f"pgd{recipe.eval.steps}"


def metric_columns(recipe: Recipe) -> list[str]:
    """metrics.csv's columns: training means, then clean and PGD accuracy per split (e.g. `test_pgd10_acc`)."""
    return TRAIN_COLUMNS + [f"{split}_{attack}_acc" for split in SPLITS for attack in ("clean", monitor_attack(recipe))]


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


@torch.no_grad()
def sync_buffers(accelerator: Accelerator, how: str, *modules: nn.Module) -> None:
    """Gives every process the same floating buffers (BatchNorm running statistics, which each process updates
    from its own batches): rank 0's (`broadcast`, as DDP does before each forward) or their mean (`average`)."""
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.copy_(broadcast(buffer) if how == "broadcast" else accelerator.reduce(buffer, reduction="mean"))


def replica_checksums(accelerator: Accelerator, *modules: nn.Module) -> list[float]:
    """A checksum of each module's parameters and buffers (the SGLR bank included) from every process."""
    local = torch.stack([sum((t.double().sum() for t in m.state_dict().values() if t.is_floating_point()),
                             torch.zeros((), dtype=torch.float64)).to(accelerator.device) for m in modules])
    return accelerator.gather(local[None]).view(-1, len(modules)).tolist()


def _write_metrics(path: Path, history: list[dict], columns: list[str]) -> None:
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


def _flat(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The recipe as flat `section.key` scalars, as trackers' hyper-parameter tables want them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, bool)) else str(value)
    return flat


def _format_row(row: dict, attack: str) -> str:
    def cell(key: str, width: int = 6) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value in (None, "") else f"{value:>{width}.2f}"

    accuracies = " | ".join(f"{split} {cell(f'{split}_clean_acc')} {cell(f'{split}_{attack}_acc')}" for split in SPLITS)
    return (f"epoch {row['epoch']:>4} | lr {row['lr']:.4f} | loss {row['loss']:.4f} | adv acc {cell('train_adv_acc')}"
            f" | grad {cell('grad_norm')} | {row['img_per_s']:>7.1f} img/s | clean/{attack}: {accuracies}")


def export(model: nn.Module, run: RunDir, which: str, class_names: list[str]) -> None:
    """Writes the `best/` or `last/` export: refused when the folder is a link, never written through a link planted
    at one of its files (removed); a failed write is one line naming the folder."""
    folder = run.export(which)
    refuse_link(folder)
    for path in (ModelFolder(folder).config, ModelFolder(folder).weights):
        if path.is_symlink():
            path.unlink()
    try:
        save_pretrained(model, folder, label_names=class_names)
    except OSError as error:
        raise WriteFailed(folder, error) from error
    except SafetensorError as error:  # safetensors' own I/O errors, e.g. "No space left on device (os error 28)"
        raise UserError(f"could not write {folder}: {error}") from error


def data_fingerprint(data: ImageSet) -> str:
    """sha256 of a split's class names, images and labels: a resumed run checks that it trains on the same data."""
    digest = hashlib.sha256(json.dumps([data.class_names, list(data.images.shape)]).encode())
    for tensor in (data.images, data.labels):
        digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()


def max_steps_reached(recipe: Recipe, state: RunState) -> bool:
    return any(limit and state.global_step >= limit for limit in (recipe.run.max_steps, recipe.schedule.steps))


def epoch_steps(recipe: Recipe, first_step: int, batches: int) -> int:
    """How many steps an epoch that starts after `first_step` runs: its batches, cut at run.max_steps or
    schedule.steps (a budgeted run's last epoch)."""
    return min([batches, *(limit - first_step for limit in (recipe.run.max_steps, recipe.schedule.steps) if limit)])


def train_one_epoch(epoch: int, model: nn.Module, unwrapped: nn.Module, objective: Objective,
                    optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, recipe: Recipe,
                    accelerator: Accelerator, state: RunState, memory_format: torch.memory_format,
                    replan: Replan | None = None, claims: hardware.ThreadClaims | None = None,
                    progress_bar: bool = True) -> dict[str, float]:
    """One pass over the training data (or up to run.max_steps, schedule.steps): attack, objective, optimizer
    step, the objective's own update. Returns the epoch's training metrics, over all processes, and records in
    `state` where it stopped; an epoch that run.max_steps stopped inside (`state.epoch_step`) goes on after the
    steps done, with their sums. `replan` may re-size a budgeted run after one of its steps (`recipe` is changed in
    place); `claims` shares the CPU threads with other runs that start meanwhile; `progress_bar` shows the epoch's
    progress bar."""
    finetune.set_train_mode(model)  # model.train(), but a frozen backbone stays in eval mode
    attack = recipe.attack
    done = state.epoch_step if state.epoch == epoch else 0
    before = state.epoch_sums if done else {}  # the reduced sums: carried by one process
    sums = {name: torch.tensor(before.get(name, 0.0) if accelerator.is_main_process else 0.0,
                               device=accelerator.device) for name in SUMS}
    started, first_step = time.perf_counter(), state.global_step - done  # the global step the epoch began after
    batches = tqdm(accelerator.skip_first_batches(loader, done) if done else loader, initial=done, leave=False,
                   desc=f"epoch {epoch}/{recipe.schedule.epochs}", total=epoch_steps(recipe, first_step, len(loader)),
                   disable=not (progress_bar and accelerator.is_local_main_process))
    for step, (images, labels, index) in enumerate(batches, start=done):
        schedule = recipe.schedule
        progress = epoch_progress(schedule.epochs, schedule.steps, state.global_step, len(loader), schedule.plans)
        lr = recipe.optim.lr * lr_factor(schedule, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # finetune.param_groups: the backbone's own rate
        x = to_float(images, recipe.data.image_size)
        x = augment(x) if recipe.data.augment else x
        x = x.contiguous(memory_format=memory_format)
        with accelerator.autocast():
            x_adv = pgd(unwrapped, x, labels, threat=attack.threat, eps=float(attack.eps),
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
        objective.after_step(out, unwrapped, accelerator.gather_for_metrics)
        sums["loss"] += loss.detach().float() * len(labels)
        sums["adv_correct"] += (out["logits"].argmax(1) == labels).sum()
        sums["grad_norm"] += grad_norm  # the global norm: the same on every process
        sums["examples"] += len(labels)
        sums["steps"] += 1
        state.global_step += 1
        if replan is not None:
            replan.after_step(state.global_step, recipe, objective)
            batches.total = epoch_steps(recipe, first_step, len(loader))
        if claims is not None and (threads := claims.share()) is not None:
            tqdm.write(f"threads: now {threads.value}: {threads.reason}")
        if max_steps_reached(recipe, state):
            break
    seconds = time.perf_counter() - started + before.get("seconds", 0.0)
    total = dict(zip(sums, accelerator.reduce(torch.stack(list(sums.values())), reduction="sum").tolist(),
                     strict=True))
    position = state.global_step - first_step
    # Stopped inside the epoch by run.max_steps (not at a budget's planned end): a continued run goes on from here.
    inside = position < len(loader) and not (recipe.schedule.steps and state.global_step >= recipe.schedule.steps)
    state.epoch, state.epoch_step = epoch, position if inside else 0
    state.epoch_sums = {**total, "seconds": seconds} if inside else {}
    group = optimizer.param_groups[0]  # the last step's rate, without a fine-tuned backbone's scale
    return {"steps": position, "lr": group["lr"] / group.get("lr_scale", 1.0), "loss": total["loss"] / total["examples"],
            "train_adv_acc": 100 * total["adv_correct"] / total["examples"],
            "grad_norm": total["grad_norm"] / total["steps"], "img_per_s": total["examples"] / seconds,
            "epoch_s": seconds}


def median_step_seconds(step: Callable[[], None], device: torch.device, timed: int = 5) -> float:
    """The median time of `timed` calls of `step` after a warm-up call (kernel choice, compilation). The median, so
    that one step slowed by another program does not shrink a budgeted run (the plan is made once); a machine slow
    for the whole calibration still is (benchmarks/RESULTS.md)."""
    times = []
    for _ in range(1 + timed):
        clock = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - clock)
    return statistics.median(times[1:])


@dataclass
class Replan:
    """Plans the rest of a budgeted run again every `every` steps from the run's own speed: a plan made from a few
    timed steps misjudges a shared machine whose speed drifts by 10-20% from minute to minute
    (benchmarks/RESULTS.md). The step time is the slower of the run's mean so far and the mean since the last
    plan, so that a slowdown late in a long run, which the mean hides, still shortens it. The monitoring and
    final-evaluation costs, timed with the calibration, are scaled by the ratio of that to the calibrated step."""

    accelerator: Accelerator
    run: RunDir
    budget_s: float
    started: float  # time.perf_counter() at the start of train(): what the budget counts from
    every: int
    calibrated_step_s: float
    monitor_s: float  # one monitoring pass, as calibrated
    final_s: float  # the final evaluation, as calibrated
    steps_per_epoch: int
    start_fraction: float | None  # SGLR's method.start_epoch when a fraction of the run
    timed_s: float = 0.0
    timed_steps: int = 0
    recent_s: float = 0.0  # the same, since the last plan
    recent_steps: int = 0
    last_step_done: float = 0.0

    def after_step(self, global_step: int, recipe: Recipe, objective: Objective) -> None:
        """Times the step (not an epoch's first: it follows monitoring and checkpoints) and, every `every` steps
        before the end, re-sizes the run: `recipe`'s schedule in place, SGLR's start epoch made absolute (a start
        that has begun stays), the resolved recipe rewritten, so that rerunning it repeats every plan."""
        now = time.perf_counter()
        if (global_step - 1) % self.steps_per_epoch:
            self.timed_s, self.timed_steps = self.timed_s + now - self.last_step_done, self.timed_steps + 1
            self.recent_s, self.recent_steps = self.recent_s + now - self.last_step_done, self.recent_steps + 1
        self.last_step_done = now
        if global_step % self.every or global_step >= recipe.schedule.steps or not self.timed_steps:
            return
        recent_step_s = self.recent_s / self.recent_steps if self.recent_steps else 0.0
        self.recent_s, self.recent_steps = 0.0, 0
        step_s, elapsed = self.accelerator.gather(torch.tensor(
            [[max(self.timed_s / self.timed_steps, recent_step_s), now - self.started]],
            device=self.accelerator.device, dtype=torch.float64)).amax(0).tolist()
        scale = step_s / self.calibrated_step_s
        plan = plan_budget(self.budget_s, elapsed, step_s=step_s, steps_per_epoch=self.steps_per_epoch,
                           monitor_s=scale * self.monitor_s, monitor_every=recipe.eval.every,
                           final_s=scale * self.final_s, done_steps=global_step)
        if plan.steps == global_step:  # nothing more fits: one more step, so that a plan still ends after its start
            plan = dataclasses.replace(plan, steps=global_step + 1, train_s=step_s,
                                       epochs=math.ceil((global_step + 1) / self.steps_per_epoch))
        tree = recipe.to_dict()
        tree["schedule"].update(steps=plan.steps, epochs=plan.epochs,
                                plans=[*(recipe.schedule.plans or [[0, recipe.schedule.steps]]), [global_step, plan.steps]])
        if self.start_fraction is not None:
            epoch = global_step // self.steps_per_epoch + 1  # the epoch of the next step
            start = recipe.start_epoch if recipe.start_epoch <= epoch else max(
                epoch + 1, round(self.start_fraction * tree["schedule"]["epochs"]))
            tree["method"]["start_epoch"] = start
        replanned = from_dict(tree, source="schedule.budget")
        recipe.schedule, recipe.method = replanned.schedule, replanned.method
        if isinstance(objective, SGLR):
            objective.start_epoch = recipe.start_epoch
        if self.accelerator.is_main_process:  # the message goes above the epoch's progress bar
            save_recipe(recipe, self.run.recipe)
            tqdm.write(f"schedule.budget: planned again after {global_step} steps ({elapsed:.0f} s spent): "
                       f"{plan.describe(step_s, self.steps_per_epoch)}")


def fit_to_budget(recipe: Recipe, splits: Splits, accelerator: Accelerator, speed: hardware.SpeedSettings,
                  run: RunDir, started: float) -> tuple[Recipe, Replan | None]:
    """The recipe with `schedule.budget` (the whole train() call, from `started`) turned into `schedule.steps` and
    `schedule.epochs`: what rerunning the run's resolved recipe repeats exactly, and the `Replan` that revises
    them every REPLAN_EVERY of the run (None when the plan is too short to revise).

    The training step and the monitoring attack are timed on a throwaway model, objective and optimizer with the
    random number generators restored afterwards, so the run itself is the one its resolved recipe describes. The
    evaluations are costed as if every image were attacked (the evaluator attacks the clean-correct ones only), so
    the plan errs on the short side. A resumed run keeps the numbers its resolved recipe already holds.
    """
    if recipe.run.resume != "never" and run.recipe.is_file():
        saved = load_recipe(run.recipe)
        if saved.schedule.budget is None and saved.schedule.steps is not None:
            accelerator.print(f"schedule.budget: resuming, so keeping the {saved.schedule.steps} steps planned in "
                              f"{run.recipe}; a new budget needs a new run (run.name=...)")
            tree = recipe.to_dict()
            tree["schedule"] = saved.to_dict()["schedule"]
            tree["method"]["start_epoch"] = saved.method.start_epoch
            return from_dict(tree, source=str(run.recipe)), None
    if "autoattack" in recipe.eval.final_attacks:
        raise UserError("schedule.budget: AutoAttack's time cannot be predicted; drop it from eval.final_attacks "
                        "and run `sglr-zoo eval` on the export afterwards")
    if recipe.method.name.startswith("sglr") and recipe.method.start_epoch >= 1:
        raise UserError("method.start_epoch: with schedule.budget the number of epochs is decided at run time; "
                        "give the start as a fraction of the run (e.g. 0.5)")
    probe_n = min(recipe.eval.batch_size, len(splits.test), 64)
    probe = from_dict(recipe.to_dict(), ["schedule.budget=null"], source="schedule.budget")
    memory_format = torch.channels_last if speed.channels_last.value else torch.contiguous_format
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = finetune.build_model(probe, splits.num_classes, splits.train.class_names)
        model = model.to(device, memory_format=memory_format)
        objective = build_objective(probe.method, labels=splits.train.labels, num_classes=splits.num_classes,
                                    start_epoch=1, model=model).to(device)  # refined labels: the costlier step
        optimizer = torch.optim.SGD(finetune.param_groups(model, probe), lr=probe.optim.lr,
                                    momentum=probe.optim.momentum, weight_decay=probe.optim.weight_decay,
                                    nesterov=probe.optim.nesterov)
        trained = torch.compile(model) if speed.compile.value else model
        # The probe's batch, on the device as a prepared loader delivers it (the timed steps exclude the copy).
        batches = torch.utils.data.DataLoader(IndexedDataset(splits.train),
                                              batch_size=recipe.run.batch_size // accelerator.num_processes)
        loader = [[t.to(device) for t in next(iter(batches))]]  # every timed step trains on this one batch
        state = RunState()

        def one_step() -> None:
            probe.run.max_steps = state.global_step + 1
            train_one_epoch(1, trained, trained, objective, optimizer, loader, probe, accelerator, state, memory_format,
                            progress_bar=False)

        step_s = median_step_seconds(one_step, device)
        # One "pass": a forward and backward of one image in fp32, eval mode, as the evaluator's attacks run.
        x = to_float(splits.test.images[:probe_n], recipe.data.image_size).to(device, memory_format=memory_format)
        y = splits.test.labels[:probe_n].to(device)
        attack_s = median_step_seconds(lambda: pgd(trained, x, y, threat=recipe.attack.threat,
                                                   eps=float(recipe.eval_eps), steps=recipe.eval.steps),
                                       device, timed=1)  # a warm-up, then one timed (and on a GPU, waited for)
        pass_s = attack_s / (probe_n * recipe.eval.steps)
    # Every process sizes the run from the slowest one's times.
    step_s, pass_s, elapsed = accelerator.gather(torch.tensor(
        [[step_s, pass_s, time.perf_counter() - started]], device=device, dtype=torch.float64)).amax(0).tolist()
    # A monitoring pass per epoch: eval.n images of each split, a clean forward and eval.steps attack steps (+1).
    monitored = sum(min(len(data), recipe.eval.n) for data in (splits.train, splits.val, splits.test) if data is not None)
    final_passes = sum(1 if attack == "clean" else int(attack.removeprefix("pgd").removeprefix("cw")) + 1
                       for attack in recipe.eval.final_attacks)
    final_n = min(recipe.eval.final_n, len(splits.test))
    exports = 2 if splits.val is not None else 1
    budget_s, steps_per_epoch = parse_budget(recipe.schedule.budget), math.ceil(len(splits.train) / recipe.run.batch_size)
    monitor_s = pass_s * monitored * (recipe.eval.steps + 2)
    final_s = exports * pass_s * (final_n * final_passes + FINAL_SANITY_PASSES)
    plan = plan_budget(budget_s, elapsed, step_s=step_s, steps_per_epoch=steps_per_epoch, monitor_s=monitor_s,
                       monitor_every=recipe.eval.every, final_s=final_s)
    summary = (f"budget {budget_s:.0f} s: {elapsed:.0f} s spent before training (data, calibration); "
               f"{plan.describe(step_s, steps_per_epoch)}")
    if plan.steps < 1:
        raise UserError(f"schedule.budget: {recipe.schedule.budget} leaves no time to train ({summary}); raise it, "
                        "or lower eval.n, eval.final_n or data.n_test")
    every = math.ceil(REPLAN_EVERY * plan.steps)
    start_fraction = recipe.method.start_epoch if recipe.method.start_epoch < 1 else None
    replan = Replan(accelerator, run, budget_s, started, every, step_s, monitor_s, final_s, steps_per_epoch,
                    start_fraction) if 3 <= every < plan.steps else None
    accelerator.print(f"schedule.budget: {summary}" + (f"; planned again every {every} steps" if replan else ""))
    return from_dict(recipe.to_dict(), ["schedule.budget=null", f"schedule.steps={plan.steps}",
                                        f"schedule.epochs={plan.epochs}"], source="schedule.budget"), replan


def _process_group_options() -> dict[str, timedelta]:
    """torch.distributed's options: the collectives' timeout from $SGLR_ZOO_PROCESS_GROUP_TIMEOUT when set."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return {}
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UserError(f"{TIMEOUT_ENV}={value!r}: give the process group's timeout as a positive number of seconds")
    return {"timeout": timedelta(seconds=seconds)}


def _write_run_info(run: RunDir, recipe: Recipe, splits: Splits, state: RunState, accelerator: Accelerator,
                    checksums: list[list[float]], command: str, **extra: object) -> None:
    """run.json: what was run and how it ended, local paths shortened as in published results (`public_paths`):
    run directories get published."""
    best = state.best_epoch or None
    info = {"sglr_zoo_version": sglr_zoo.__version__, "git_commit": _git_commit(), "command": command,
            "seed": recipe.run.seed, "last_epoch": state.epoch, "best_epoch": best,
            "best_metric": f"val_{monitor_attack(recipe)}_acc" if best else None,
            "best_value": state.best_val_pgd if best else None, "num_processes": accelerator.num_processes,
            "replica_checksums": checksums, **extra, "class_names": splits.train.class_names,
            "num_examples_train": len(splits.train), "data_source": splits.source}
    write_atomic(run.run_info, json.dumps(public_paths(info), indent=2).encode())


def final_evaluation(run: RunDir, which: str, splits: Splits, recipe: Recipe, device: torch.device,
                     command: str) -> Results:
    """Evaluates an export (reloaded from its folder, fp32) on the first eval.final_n test examples and writes
    its `results.json`: the numbers model cards show. AutoAttack's progress is kept beside it, so a killed
    evaluation resumes where it stopped."""
    n = min(recipe.eval.final_n, len(splits.test))
    model = for_evaluation(load_pretrained(f"local-dir:{run.export(which)}"), device)
    results = evaluate(model, to_float(splits.test.images[:n], recipe.data.image_size), splits.test.labels[:n],
                       threat=recipe.attack.threat, eps=recipe.eval_eps, attacks=recipe.eval.final_attacks,
                       batch_size=recipe.eval.batch_size, seed=recipe.run.seed, num_classes=splits.num_classes,
                       state_path=run.autoattack_state(which), device=device, progress=True,
                       provenance=Provenance(model=f"{run.root.name}/{which}", dataset=recipe.data.dataset,
                                             split=recipe.data.test_split, source=splits.source,
                                             which=f"first {n} of the {recipe.data.test_split} split, in order",
                                             command=command))
    results.save(run.results(which))
    print(f"{which}: {results.summary()}")
    return results


def train(recipe: Recipe, *, command: str = "") -> Path:
    """Trains the recipe's model and returns the run directory."""
    claims = hardware.ThreadClaims()
    try:
        return _train(recipe, command, claims)
    finally:
        claims.release()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # Accelerate's state is process-wide and fixes the precision on first use: reset it (accelerate's own
            # tests do the same) so that the next train() in this process, after success or an error, chooses again.
            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def _train(recipe: Recipe, command: str, claims: hardware.ThreadClaims) -> Path:
    started = time.perf_counter()  # schedule.budget counts from here
    run = RunDir(Path(recipe.run.output_dir) / (recipe.run.name or "run"))
    # Under torchrun on a machine without GPUs, accelerate goes multi-process (gloo) only with cpu=True; without it
    # every process would train alone, all writing the same run directory.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    processes = PartialState(cpu=multi_cpu, **_process_group_options())
    with claims.deciding():  # a run launched in the same second waits here, then sees this one's threads
        speed = hardware.resolve(recipe.run, processes.device, claimed=claims.others(),
                                 local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        claims.claim(speed.threads.value,
                     shared=recipe.run.threads == "auto" and not os.environ.get("OMP_NUM_THREADS"))
    if processes.num_processes > 1:  # one decision for all: the probe could land differently on a busy machine
        speed = broadcast_object_list([speed])[0]
    hardware.apply(speed)
    accelerator = Accelerator(mixed_precision=speed.mixed_precision.value, cpu=multi_cpu,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(run.root),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    _check_hardware(recipe, accelerator)
    accelerator.print(f"run directory: {run.root}")
    accelerator.print(speed.describe())
    set_seed(recipe.run.seed)

    finetune.resolve(recipe)  # a fine-tuning backbone fixes the architecture and the input size
    splits = load_splits(recipe.data)
    replan = None
    if recipe.schedule.budget is not None:
        recipe, replan = fit_to_budget(recipe, splits, accelerator, speed, run, started)
    per_process_batch = recipe.run.batch_size // accelerator.num_processes
    # Its own generator: starting an epoch's iteration (or continuing one) draws no number from the global one.
    train_loader = torch.utils.data.DataLoader(IndexedDataset(splits.train), batch_size=per_process_batch, shuffle=True,
                                               num_workers=recipe.run.num_workers, generator=torch.Generator())

    model = finetune.build_model(recipe, splits.num_classes, splits.train.class_names)
    if recipe.finetune.backbone is not None:
        accelerator.print(finetune.describe(model, recipe, splits.num_classes))
    if recipe.run.sync_batchnorm and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if speed.channels_last.value else torch.contiguous_format
    model = model.to(accelerator.device, memory_format=memory_format)
    objective = build_objective(recipe.method, labels=splits.train.labels, num_classes=splits.num_classes,
                                start_epoch=recipe.start_epoch, model=model).to(accelerator.device)
    optimizer = torch.optim.SGD(finetune.param_groups(model, recipe), lr=recipe.optim.lr,
                                momentum=recipe.optim.momentum, weight_decay=recipe.optim.weight_decay,
                                nesterov=recipe.optim.nesterov)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps = recipe.schedule.steps
    if steps is not None and math.ceil(steps / len(train_loader)) != recipe.schedule.epochs:
        raise UserError(f"schedule.steps: {steps} steps of {len(train_loader)} per epoch take "
                        f"{math.ceil(steps / len(train_loader))} epochs; set schedule.epochs to that")
    # Three views of one set of weights. `model` (prepared: DDP when several processes, compiled if asked) trains.
    # `unwrapped` has no DDP and no autocast wrapper (removed in place; training autocasts explicitly): attacks and
    # monitoring through it all-reduce nothing and monitoring runs in fp32. `plain` is also uncompiled: what the
    # exports, the replica checksums and the buffer sync read.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    plain = unwrapped
    if speed.compile.value:  # after prepare: unwrapping a compiled module under autocast breaks its forward
        compiled = torch.compile(unwrapped)
        model, unwrapped = compiled if model is unwrapped else torch.compile(model), compiled
    state = RunState()
    state.data_sha256 = data_fingerprint(splits.train)
    checkpointer = Checkpointer(accelerator, run, model=plain, objective=objective, optimizer=optimizer, state=state,
                                recipe=recipe)

    lock, resume_from = open_run(accelerator, run, recipe, state)  # one run per directory: locked until finish_run
    if resume_from is not None:
        data_sha256 = state.data_sha256
        checkpointer.load(resume_from)
        if state.data_sha256 not in (None, data_sha256):  # None: a checkpoint of an older sglr-zoo
            raise UserError(f"data.dataset: the training data at {recipe.data.dataset} is not the data {resume_from} "
                            "was trained on (sha256 of its images and labels); restore that data, or train anew "
                            "under another run.name or run.output_dir")
        state.data_sha256 = data_sha256
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.global_step}"
                          f"{', inside the epoch' if state.epoch_step else ''})")
    if accelerator.is_main_process:
        save_recipe(recipe, run.recipe)

    accelerator.init_trackers("tensorboard", config=_flat(recipe.to_dict()))
    attack, columns = monitor_attack(recipe), metric_columns(recipe)
    epoch = state.epoch - (state.epoch_step > 0)  # a run stopped inside an epoch goes on in it
    # Not a range over the epochs: a budget's second plan may change them during the first.
    while epoch < recipe.schedule.epochs and not max_steps_reached(recipe, state):  # (a resumed run may be done)
        epoch += 1
        train_loader.set_epoch(epoch)
        row = {"epoch": epoch, **train_one_epoch(epoch, model, unwrapped, objective, optimizer, train_loader, recipe,
                                                 accelerator, state, memory_format, replan, claims)}
        # Each process updated BatchNorm statistics from its own batches: align them before they are measured,
        # exported or checkpointed.
        sync_buffers(accelerator, recipe.run.buffer_sync, plain, *objective.local_modules())
        last_epoch = epoch == recipe.schedule.epochs or max_steps_reached(recipe, state)
        if epoch % recipe.eval.every == 0 or last_epoch:
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                row.update(monitor(unwrapped, splits, recipe, accelerator))
        state.history = [r for r in state.history if r["epoch"] != epoch] + [row]  # one row an epoch
        accelerator.print(_format_row(row, attack))
        if state.epoch_step:  # a part: neither logged nor a candidate for best/, as an uninterrupted run
            accelerator.print(f"run.max_steps: stopped after step {state.epoch_step} of epoch {epoch}'s "
                              f"{len(train_loader)}; rerun it with a larger run.max_steps, or none, to train on from there")
        else:
            accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if not state.epoch_step and row.get(f"val_{attack}_acc", -1) > state.best_val_pgd:
            state.best_val_pgd, state.best_epoch = row[f"val_{attack}_acc"], epoch
            if accelerator.is_main_process:
                export(plain, run, "best", splits.train.class_names)
        if accelerator.is_main_process:
            _write_metrics(run.metrics, state.history, columns)
            plot_curves(state.history, run.curves, attack)
        if epoch % recipe.run.checkpoint_every == 0 or last_epoch:
            checkpointer.save(epoch)
        if last_epoch:
            break

    # The end: exports and run.json first (no check below can lose them), then the process group ends, and the
    # main process alone evaluates the exports: the other processes wait in no collective however long it takes.
    checksums = replica_checksums(accelerator, plain, objective)
    if accelerator.is_main_process:
        export(plain, run, "last", splits.train.class_names)
        _write_run_info(run, recipe, splits, state, accelerator, checksums, command, speed=speed.to_dict())
    if any(replica != checksums[0] for replica in checksums):
        raise RuntimeError(f"processes ended with different weights or soft labels: {checksums} (run.json); "
                           "last/ holds the main process's")
    accelerator.end_training()  # stops the trackers and destroys the process group
    if accelerator.is_main_process:
        for which in run.exports():
            final_evaluation(run, which, splits, recipe, accelerator.device, command)
    finish_run(accelerator, run, lock, state, recipe)  # marks it finished and unlocks it: rerunning it is refused
    return run.root
