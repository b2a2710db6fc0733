"""The rules for (re)starting a run in its directory, applied before it trains, and the mark of a finished run.

`open_run` takes the directory: one run per directory (RunLock), checkpoints/, best/ and last/ are not links, a
finished run (RUN/finished.json, written by `finish_run`) is not rerun, `resume: never` does not start over a
directory holding checkpoints, `auto` resumes from the newest checkpoint that verifies, and a resumed run keeps its
recipe (but for RESUMABLE_CHANGES) and its number of processes. The checkpoints themselves are sglr_zoo.checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from sglr_zoo.checkpoint import RECIPE, CheckpointReader, Stateful, finish_interrupted_save, latest_checkpoint
from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular, write_atomic
from sglr_zoo.recipe import Recipe, from_dict
from sglr_zoo.rundir import RunDir, RunLock
from sglr_zoo.serialization import json_bytes

# Recipe keys a resumed run may change: where the run lives, how often it saves, how it is evaluated, speed levers
# that leave the math alone, and (to go on after a divergence) optim.lr and optim.grad_clip. Any other difference
# would silently mix two recipes in one run.
RESUMABLE_CHANGES = ("run.resume", "run.max_steps", "run.num_workers", "run.compile", "run.channels_last",
                     "run.threads", "run.keep_freed_memory", "run.cudnn_benchmark", "run.output_dir", "run.name",
                     "run.checkpoint_every", "run.keep_checkpoints", "eval.", "optim.lr", "optim.grad_clip")
_MESSAGE_BYTES = 4096  # the longest error the main process shares with the others


def open_run(accelerator: Accelerator, run: RunDir, recipe: Recipe,
             state: Stateful | None = None) -> tuple[RunLock | None, Path | None]:
    """Takes the run directory for this run and says which checkpoint to resume from (None: start afresh).

    The main process locks RUN/.lock for the whole run (one run per directory) and applies the directory's rules;
    every process gets its decision, so all of them stop with the same UserError when it refuses:
    checkpoints/, best/ and last/ are not links; a finished run is not rerun; `run.resume: never` does not start
    over checkpoints; `auto` resumes from the newest checkpoint that verifies (and whose run state `state`
    accepts), after finishing a save that a kill interrupted between its renames; a folder is resumed only when it is
    this run's newest; a resumed run's recipe may differ from its checkpoint's only in RESUMABLE_CHANGES, and its
    number of processes not at all.

    Returns:
        the lock (main process only; release it with `finish_run`) and the checkpoint folder or None.
    """
    lock = None

    def decide() -> int:
        nonlocal lock
        lock = RunLock.acquire(run)
        try:
            run.refuse_links()
            finish_interrupted_save(run)
            return _resume_epoch(run, recipe, accelerator.num_processes, state)
        except UserError:
            lock.release()
            raise

    epoch = _decided_by_main(accelerator, decide)
    if epoch == 0:
        return lock, None
    return lock, run.checkpoint(epoch) if recipe.run.resume == "auto" else Path(recipe.run.resume)


def finish_run(accelerator: Accelerator, run: RunDir, lock: RunLock | None, state: Stateful, recipe: Recipe) -> None:
    """Marks the run finished (RUN/finished.json) and unlocks it: the last thing a run does. Uses no collective
    (the process group may have ended)."""
    if accelerator.is_main_process:
        done = {"epoch": state.epoch, "global_step": state.global_step, "epochs": recipe.schedule.epochs,
                "max_steps": recipe.run.max_steps}
        if state.epoch_step:  # run.max_steps stopped it inside its epoch, maybe the last: it may train on
            done["epoch_step"] = state.epoch_step
        write_atomic(run.finished, json_bytes(done))
        lock.release()


def _decided_by_main(accelerator: Accelerator, decide: Callable[[], int]) -> int:
    """Runs `decide` on the main process and gives its result, or its UserError, to every process."""
    code, message = 0, b""
    if accelerator.is_main_process:
        try:
            code = decide()
        except UserError as error:
            code, message = -1, str(error).encode()[:_MESSAGE_BYTES]
    if accelerator.num_processes > 1:
        header = broadcast(torch.tensor([code, len(message)], dtype=torch.int64, device=accelerator.device))
        text = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
        text[:len(message)] = torch.tensor(list(message), dtype=torch.uint8)
        text = broadcast(text.to(accelerator.device)).cpu()
        code = int(header[0])
        message = bytes(text[:int(header[1])].tolist())
    if code < 0:
        raise UserError(message.decode(errors="replace"))
    return code


def _resume_epoch(run: RunDir, recipe: Recipe, processes: int, state: Stateful | None = None) -> int:
    """The epoch of the checkpoint to resume from with `processes` processes, 0 to start afresh; raises UserError
    when the directory's rules refuse this run."""
    refuse_if_finished(run, recipe)
    found = run.checkpoint_dirs()
    mode = recipe.run.resume
    elsewhere = "pick another run.name or run.output_dir"
    if mode == "never":
        if found:
            raise UserError(f"run.resume: never, but {run.checkpoints} holds checkpoints ({found[-1].name}): "
                            f"{elsewhere}, or delete {run.root}, or resume it with run.resume: auto")
        return 0
    if mode == "auto":
        folder = latest_checkpoint(run.checkpoints, state)
        if folder is None:
            if found:
                raise UserError(f"run.resume: auto, but no checkpoint in {run.checkpoints} verifies (warnings above "
                                f"say why): {elsewhere}, or delete {run.checkpoints} to start over")
            return 0
    else:
        folder = Path(mode)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "not found"
            raise UserError(f"run.resume: checkpoint folder {folder} {what}; use auto, never or a checkpoint folder "
                            "(checkpoints/epoch_NNNN)")
        if found and folder.resolve() != found[-1].resolve():
            raise UserError(f"run.resume: {folder}: {run.checkpoints} already holds this run's checkpoints up to "
                            f"{found[-1].name}, which run.resume: auto continues; to continue from {folder} "
                            f"instead, {elsewhere}")
    reader = CheckpointReader(folder)
    if mode != "auto":  # latest_checkpoint verified it already
        reader.verify()
    if reader.num_processes != processes:
        # Each process's data shard, batch and random state depend on the count: the run would not go on as it began.
        raise UserError(f"run.resume: {folder} was written with num_processes={reader.num_processes}, and this run "
                        f"has {processes}: resume it with {reader.num_processes} (accelerate launch --num_processes "
                        f"{reader.num_processes}), or train anew under another run.name or run.output_dir")
    _check_same_recipe(reader, recipe)
    return reader.epoch


def refuse_if_finished(run: RunDir, recipe: Recipe) -> None:
    """A finished run is not rerun, unless it stopped at run.max_steps (before its last epoch, or inside one) and
    the new recipe asks for more steps."""
    try:
        done = json.loads(read_regular(run.finished, TEXT_LIMIT, "finished-run marker"))
        epoch, global_step = int(done["epoch"]), int(done["global_step"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise UserError(f"{run.finished}: not a finished-run marker ({error!r}); delete it if the run did not "
                        "finish") from None
    max_steps = recipe.run.max_steps
    if (epoch < recipe.schedule.epochs or done.get("epoch_step")) and (max_steps is None or max_steps > global_step):
        return  # it stopped at its max_steps; this recipe trains on
    which = (run.exports() or ["last"])[0]
    raise UserError(f"{run.root} already finished (epoch {epoch}, step {global_step}; {run.finished.name}): it is "
                    f"neither trained nor evaluated again. To evaluate it again: `sglr-zoo eval "
                    f"{run.export(which)} --dataset {recipe.data.dataset} --out results.json`; to train anew, pick "
                    "another run.name or run.output_dir")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":  # model.kwargs is one value
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_recipe(reader: CheckpointReader, recipe: Recipe) -> None:
    saved, current = from_dict(reader.json(RECIPE), source=str(reader.folder / RECIPE)).to_dict(), recipe.to_dict()
    before, now = _flat(saved), _flat(current)  # a budget's plans are in the run state, not in the recipe
    changed = [key for key in sorted(before.keys() | now.keys())
               if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = ", ".join(f"{key} ({before.get(key)!r} -> {now.get(key)!r})" for key in changed[:6])
        raise UserError(f"run.resume: the recipe differs from the one {reader.folder} was trained with in "
                        f"{details}{' ...' if len(changed) > 6 else ''}; a resumed run may change only "
                        f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_CHANGES)}. Restore those "
                        "keys, or train anew under another run.name or run.output_dir")
