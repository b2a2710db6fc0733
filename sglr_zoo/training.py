"""Adversarial training on Accelerate, one linear loop: data -> model -> objective -> optimizer -> prepare -> epochs.

Run it with `sglr-zoo train RECIPE` or `accelerate launch train.py RECIPE`. The run directory gets the resolved
recipe (written once, at the start: a run never changes its recipe), a budgeted run's plans (`plans.json`, see
sglr_zoo.budget), `run.json`, `metrics.csv`, `curves.png`, atomic per-epoch checkpoints (`checkpoints/epoch_NNNN`,
resumed with `run.resume: auto`), and `best/` (by validation PGD accuracy) and `last/` model exports. After the
last epoch the exports and run.json are written, the process group ends, and the main process alone evaluates
the exports (`results.json` beside each), so a long AutoAttack never runs into the process group's timeout.

The step and the epoch are sglr_zoo.loop's (`train_step`, `train_one_epoch`); the time budget's re-planning and the
sharing of CPU threads are loop callbacks. The run's process-wide settings (threads, cuDNN's flag, malloc) are
restored when train() returns or raises.

A run that `run.max_steps` stops inside an epoch is checkpointed there, with its position in the epoch; continuing
it trains exactly the remaining steps, bit for bit as an uninterrupted run: an epoch's data order depends on the
seed and the epoch alone (accelerate's seedable sampler, with its own generator), and monitoring draws no random
number that training would.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import subprocess
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors import SafetensorError
from torch import nn

import sglr_zoo
from sglr_zoo import finetune, hardware
from sglr_zoo.averaging import Averaging, WeightAverage
from sglr_zoo.budget import FINAL_SANITY_PASSES, picked, plan_run  # noqa: F401  (experiments/ read the first here)
from sglr_zoo.checkpoint import Checkpointer
from sglr_zoo.data import IndexedDataset, Splits, load_splits, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import evaluate, for_evaluation
from sglr_zoo.files import WriteFailed, refuse_link, write_atomic
from sglr_zoo.guard import OverfittingGuard
from sglr_zoo.loop import StepParts, TrainingDiverged, max_steps_reached, train_one_epoch  # noqa: F401 (re-exported)
from sglr_zoo.lp_ft import ProbeThenTune
from sglr_zoo.models import load_pretrained, save_pretrained
from sglr_zoo.monitoring import (
    flat_scalars,
    format_row,
    metric_columns,
    monitor,
    monitor_attack,
    plot_curves,
    write_metrics,
)
from sglr_zoo.objectives import build_objective
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.recipe import Recipe, save_recipe
from sglr_zoo.replicas import check_processes, replica_checksums, sync_buffers
from sglr_zoo.results import Provenance, Results, public_paths
from sglr_zoo.resume import finish_run, open_run, refuse_if_finished
from sglr_zoo.rundir import ModelFolder, RunDir
from sglr_zoo.runstate import RunState, data_fingerprint
from sglr_zoo.sharding import Shards, process_group, timeout_from_env
from sglr_zoo.threads import ThreadClaims, ThreadSharing
from sglr_zoo.warmup import EpsWarmup, describe_warmup

TIMEOUT_ENV = "SGLR_ZOO_PROCESS_GROUP_TIMEOUT"  # seconds a process waits in a collective (torch's default if unset)
MOVED = {"lr_factor": "sglr_zoo.schedule", "median_step_seconds": "sglr_zoo.budget", "REPLAN_EVERY": "sglr_zoo.budget"}


def __getattr__(name: str) -> object:
    """Names that moved out of this module: still found here, with a warning naming their home."""
    if name not in MOVED:
        raise AttributeError(f"module 'sglr_zoo.training' has no attribute {name!r}")
    warnings.warn(f"sglr_zoo.training.{name} is deprecated: import it from {MOVED[name]}", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(MOVED[name]), name)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


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


def _process_group_options() -> dict[str, timedelta]:
    """torch.distributed's options: the collectives' timeout from $SGLR_ZOO_PROCESS_GROUP_TIMEOUT when set."""
    timeout = timeout_from_env(TIMEOUT_ENV)
    return {} if timeout is None else {"timeout": timeout}


def _write_run_info(run: RunDir, recipe: Recipe, splits: Splits, state: RunState, accelerator: Accelerator,
                    checksums: list[list[float]], command: str, **extra: object) -> None:
    """run.json: what was run and how it ended, local paths shortened as in published results (`public_paths`):
    run directories get published."""
    best = state.best_epoch or None
    info = {"sglr_zoo_version": sglr_zoo.__version__, "git_commit": _git_commit(), "command": command,
            "seed": recipe.run.seed, "last_epoch": state.epoch, "best_epoch": best,
            "best_metric": f"val_{monitor_attack(recipe)}_acc" if best else None,
            "best_value": state.best_val_pgd if best else None, "num_processes": accelerator.num_processes,
            "replica_checksums": checksums, "machine": hardware.machine(accelerator.device),
            "train_seconds": round(sum(row.get("epoch_s", 0.0) for row in state.history), 1),
            **extra, "class_names": splits.train.class_names,
            "num_examples_train": len(splits.train), "data_source": splits.source}
    write_atomic(run.run_info, json.dumps(public_paths(info), indent=2).encode())


def final_evaluation(run: RunDir, which: str, splits: Splits, recipe: Recipe, device: torch.device,
                     command: str, shards: Shards = Shards()) -> Results:
    """Evaluates an export (reloaded from its folder, fp32) on the first eval.final_n test examples, each of
    `shards` taking its share of the attacks, and writes its `results.json` (the main process): the numbers model
    cards show. AutoAttack's progress is kept beside it, so a killed evaluation resumes where it stopped."""
    n = min(recipe.eval.final_n, len(splits.test))
    model = for_evaluation(load_pretrained(f"local-dir:{run.export(which)}"), device)
    results = evaluate(model, to_float(splits.test.images[:n], recipe.data.image_size), splits.test.labels[:n],
                       threat=recipe.attack.threat, eps=recipe.eval_eps, attacks=recipe.eval.final_attacks,
                       batch_size=recipe.eval.batch_size, seed=recipe.run.seed, num_classes=splits.num_classes,
                       state_path=run.autoattack_state(which), device=device, progress=True,
                       outcomes_path=Outcomes.beside(run.results(which)), shards=shards,
                       provenance=Provenance(model=f"{run.root.name}/{which}", dataset=recipe.data.dataset,
                                             split=recipe.data.test_split, source=splits.source,
                                             which=f"first {n} of the {recipe.data.test_split} split, in order",
                                             command=command))
    if shards.main:
        results.save(run.results(which))
        print(f"{which}: {results.summary()}")
    return results



def train(recipe: Recipe, *, command: str = "") -> Path:
    """Trains the recipe's model and returns the run directory. `recipe` is left as it is (the run works on a copy);
    the process's CPU threads, cuDNN flag and malloc settings are restored when it returns or raises
    (`hardware.applied`)."""
    claims = ThreadClaims()
    try:
        with contextlib.ExitStack() as scope:
            return _train(copy.deepcopy(recipe), command, claims, scope)
    finally:
        claims.release()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # Accelerate's state is process-wide and fixes the precision on first use: reset it (accelerate's own
            # tests do the same) so that the next train() in this process, after success or an error, chooses again.
            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def _train(recipe: Recipe, command: str, claims: ThreadClaims, scope: contextlib.ExitStack) -> Path:
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
    scope.enter_context(hardware.applied(speed))
    accelerator = Accelerator(mixed_precision=speed.mixed_precision.value, cpu=multi_cpu,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(run.root),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    check_processes(recipe.run, accelerator)
    accelerator.print(f"run directory: {run.root}")
    accelerator.print(speed.describe())
    set_seed(recipe.run.seed)

    finetune.resolve(recipe)  # a fine-tuning backbone fixes the architecture and the input size
    splits = load_splits(recipe.data)
    plans, callbacks = plan_run(recipe, splits, accelerator, speed, run, started)  # the recipe's, or a budget's
    recipe = picked(recipe, plans, accelerator.print)  # the architecture the budget picked; augment: auto
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
                                start_epoch=plans.in_force(0).start_epoch, model=model).to(accelerator.device)
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
    parts = StepParts(model, unwrapped, objective, optimizer, accelerator, recipe, memory_format)
    # With weight averaging on, the average is what is monitored, picks best/ and is exported.
    average = WeightAverage(plain, recipe.average.decay, recipe.average.buffers) if recipe.average.decay else None
    if average is not None:
        callbacks.append(Averaging(average, plain, plans, recipe.average.start))
        accelerator.print(f"average: {average.describe(recipe.average.start)}")
    measured = plain if average is None else average.module
    state = RunState()
    state.data_sha256 = data_fingerprint(splits.train)
    checkpointer = Checkpointer(accelerator, run, model=plain, objective=objective, optimizer=optimizer, state=state,
                                recipe=recipe, average=None if average is None else average.module)

    planned = copy.copy(recipe)  # what the finished-run marker and its check read: the plan's epochs
    planned.schedule = copy.copy(recipe.schedule)
    planned.schedule.epochs = plans.last.epochs
    refuse_if_finished(run, planned)
    lock, resume_from = open_run(accelerator, run, recipe, state)  # one run per directory: locked until finish_run
    if resume_from is not None:
        data_sha256 = state.data_sha256
        checkpointer.load(resume_from)
        if state.data_sha256 not in (None, data_sha256):  # None: a checkpoint of an older sglr-zoo
            raise UserError(f"data.dataset: the training data at {recipe.data.dataset} is not the data {resume_from} "
                            "was trained on (sha256 of its images and labels); restore that data, or train anew "
                            "under another run.name or run.output_dir")
        if plans.to_list()[:len(state.plans)] != state.plans:  # plans made after the checkpoint may follow
            raise UserError(f"{resume_from} was trained under other plans than this run's ({run.plans}, or the "
                            "recipe's); restore that file, or train anew under another run.name or run.output_dir")
        state.data_sha256 = data_sha256
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.global_step}"
                          f"{', inside the epoch' if state.epoch_step else ''})")
    if accelerator.is_main_process:  # written once: nothing changes the recipe while the run trains
        save_recipe(recipe, run.recipe)
        if recipe.schedule.budget is not None or recipe.schedule.plans is not None:
            plans.save(run.plans)
    callbacks.append(ThreadSharing(claims))  # shares the CPU threads with other runs that start meanwhile
    if recipe.finetune.mode == "lp_ft":  # before the guard, whose snapshots then hold none of the probe's momentum
        callbacks.append(ProbeThenTune(parts, plans, state))
    held_out = splits.val if splits.val is not None else splits.test
    protected = [plain, optimizer, objective, *([average] if average else [])]  # what a rollback restores
    guard = OverfittingGuard(parts, held_out, protected, state) if recipe.guarded else None
    callbacks += [guard] if guard else []
    if recipe.attack.warmup:
        callbacks.append(EpsWarmup(parts, plans, state))
        accelerator.print(describe_warmup(recipe.attack))

    accelerator.init_trackers("tensorboard", config=flat_scalars(recipe.to_dict()))
    attack, columns = monitor_attack(recipe), metric_columns(recipe)

    def limits() -> tuple[int | None, int | None]:
        return recipe.run.max_steps, plans.in_force(state.global_step).steps

    epoch = state.epoch - (state.epoch_step > 0)  # a run stopped inside an epoch goes on in it
    # Not a range over the epochs: a budget's second plan may change them during the first.
    while epoch < plans.in_force(state.global_step).epochs and not max_steps_reached(state.global_step, *limits()):
        epoch += 1
        train_loader.set_epoch(epoch)
        row = {"epoch": epoch, **train_one_epoch(epoch, parts, train_loader, state, plans, callbacks)}
        # Each process updated BatchNorm statistics from its own batches: align them before they are measured,
        # exported or checkpointed.
        sync_buffers(accelerator, recipe.run.buffer_sync, plain, *objective.local_modules(),
                     *([] if average is None else [average.module]))
        last_epoch = (epoch == plans.in_force(state.global_step).epochs
                      or max_steps_reached(state.global_step, *limits()))
        if epoch % recipe.eval.every == 0 or last_epoch:
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                row.update(monitor(unwrapped if average is None else average.module, splits, recipe, accelerator))
        state.history = [r for r in state.history if r["epoch"] != epoch] + [row]  # one row an epoch
        accelerator.print(format_row(row, attack))
        if state.epoch_step:  # a part: neither logged nor a candidate for best/, as an uninterrupted run
            accelerator.print(f"run.max_steps: stopped after step {state.epoch_step} of epoch {epoch}'s "
                              f"{len(train_loader)}; rerun it with a larger run.max_steps, or none, to train on from "
                              "there")
        else:
            accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if not state.epoch_step and row.get(f"val_{attack}_acc", -1) > state.best_val_pgd:
            state.best_val_pgd, state.best_epoch = row[f"val_{attack}_acc"], epoch
            if accelerator.is_main_process:
                export(measured, run, "best", splits.train.class_names)
        if accelerator.is_main_process:
            write_metrics(run.metrics, state.history, columns)
            plot_curves(state.history, run.curves, attack)
        for callback in callbacks:
            callback.on_epoch_end(state, row)
        if epoch % recipe.run.checkpoint_every == 0 or last_epoch:
            state.plans = plans.to_list()  # a resumed run keeps them
            checkpointer.save(epoch)
        if last_epoch:
            break

    # The end: exports and run.json first (no check below can lose them), then every process evaluates its share of
    # the exports in an evaluation group whose collectives wait as long as an AutoAttack batch takes
    # (sglr_zoo.sharding), never the training group's timeout; then the training's process group ends.
    checksums = replica_checksums(accelerator, plain, objective, *([] if average is None else [average]))
    if accelerator.is_main_process:
        export(measured, run, "last", splits.train.class_names)
        weights = "the trained weights" if average is None else average.describe(recipe.average.start)
        _write_run_info(run, recipe, splits, state, accelerator, checksums, command, speed=speed.to_dict(),
                        plans=plans.to_list(), weights=weights,
                        guard=guard.record(state) if guard else {"enabled": False},
                        backbone=finetune.backbone_record(recipe))
    if any(replica != checksums[0] for replica in checksums):
        raise RuntimeError(f"processes ended with different weights or soft labels: {checksums} (run.json); "
                           "last/ holds the main process's")
    with process_group() as shards:
        for which in run.exports():
            final_evaluation(run, which, splits, recipe, accelerator.device, command, shards)
    accelerator.end_training()  # stops the trackers and destroys the process group
    finish_run(accelerator, run, lock, state, planned)  # marks it finished and unlocks it: rerunning it is refused
    return run.root
