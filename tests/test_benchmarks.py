"""The benchmark scripts' own measurements, and the GPU presets' path through the device tool's limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def train_throughput():
    return load_script(SCRIPT, "train_throughput")


def test_op_shares_split_a_step_by_kind_of_operation(train_throughput):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 32 * 32, 10))

    def step(images, labels, index, timings):
        nn.functional.cross_entropy(model(images.float() / 255), labels).backward()

    shares = train_throughput.op_shares(step, batch=8, steps=2)
    assert list(shares) == ["convolution", "batch norm", "relu", "other aten", "not aten"]
    assert all(0 <= share <= 1 for share in shares.values()) and sum(shares.values()) == pytest.approx(1, abs=0.02)
    assert shares["convolution"] > 0 and shares["batch norm"] > 0 and shares["relu"] > 0
    assert shares["other aten"] > 0  # the linear layer, the loss


def test_fixed_batch_is_the_same_every_call(train_throughput):
    first, second = train_throughput.fixed_batch(4), train_throughput.fixed_batch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[0].dtype == torch.uint8 and first[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("method", ["sglr", "trades"])
def test_our_step_is_the_trainers(train_throughput, fresh_accelerate, monkeypatch, method):
    """The benchmark times `sglr_zoo.loop.train_step` itself, not a copy of it, and the attack's share of it."""
    import sglr_zoo.loop

    real, calls = sglr_zoo.loop.train_step, []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sglr_zoo.loop, "train_step", counted)
    levers = {"mixed_precision": "no", "channels_last": False, "compile": False, "keep_freed_memory": False,
              "threads": 1, "freeze": False}
    our_step, resolved = train_throughput.make_our_step("preactresnet_tiny_cifar", levers, method, 4, 1)
    assert resolved["freeze"] is False and resolved["mixed_precision"] == "no"
    timings = []
    our_step(*train_throughput.fixed_batch(4), timings)
    assert calls == [{"epoch": 1, "lr": 0.01, "freeze": False}]
    ((attack_s, rest_s),) = timings
    assert attack_s > 0 and rest_s > 0


# ---- the GPU presets and benchmarks/gpu_session.sh's zoo stage (benchmarks/gpu_zoo.py) -----------------------------

REPO = Path(__file__).resolve().parents[1]
ZOO_SET = ("model.arch=preactresnet_tiny_cifar schedule.epochs=2 data.val_size=16 eval.n=8 eval.final_n=16 "
           "run.batch_size=16 run.threads=1")
AA_N = 8
RETURN_FILES = 5  # of them zoo.log and zoo_run.tgz: 3 shards a call


@pytest.fixture(scope="module")
def gpu_zoo():
    yield load_script(REPO / "benchmarks" / "gpu_zoo.py", "gpu_zoo")
    del sys.modules["gpu_zoo"]


@pytest.mark.parametrize(("name", "arch", "epochs"), [("prn18_cifar10_fast.yaml", "preactresnet18_cifar", 30),
                                                      ("wrn34_cifar10_fast.yaml", "wrn34_10_cifar", 15)])
def test_fast_presets_are_sglr_with_nfgsm_averaging_and_label_smoothing(name, arch, epochs):
    from fractions import Fraction

    from sglr_zoo.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.model.arch == arch and recipe.method.name == "sglr" and recipe.schedule.epochs == epochs
    attack = recipe.attack
    assert (attack.steps, attack.step_size, attack.noise, attack.project) == (1, Fraction(8, 255), 2, False)
    assert recipe.guarded  # single-step: the overfitting guard watches it
    assert (recipe.average.decay, recipe.average.start, recipe.method.label_smoothing) == (0.999, 0.5, 0.4)
    assert (recipe.schedule.name, recipe.optim.lr, recipe.optim.nesterov) == ("onecycle", 0.2, True)
    assert recipe.schedule.budget is None  # a fixed length: a resumed run repeats the same schedule exactly
    assert recipe.data.augment and recipe.data.val_size == 1000 and recipe.data.n_train is None
    assert recipe.eval.final_attacks == ["clean", "pgd20"] and recipe.eval.final_n == 1000


def test_staged_parts_fit_their_calls_and_read_as_the_full_split(gpu_zoo, tmp_path):
    from sglr_zoo.data import load_splits
    from sglr_zoo.recipe import DataConfig
    from sglr_zoo.runstate import data_fingerprint
    from tests.conftest import write_parquet_dataset

    source = write_parquet_dataset(tmp_path / "source", n_train=64, n_test=16)
    data_dir = tmp_path / "stage" / "cifar10"
    manifest = gpu_zoo.stage_data(source, data_dir, room=100_000, n_train=40, val_size=8, n_test=16, head_rows=4)
    calls = gpu_zoo.carry_plan(manifest, data_dir)
    assert len(calls) >= 3 and all(sum(Path(p).stat().st_size for p in call) <= 100_000 for call in calls)
    assert gpu_zoo.check_data(data_dir, "train")["ready"]
    staged = load_splits(DataConfig(dataset=str(data_dir), val_size=8))
    full = load_splits(DataConfig(dataset=str(source), n_train=40, val_size=8))  # the first 40, the last 8
    for split in ("train", "val", "test"):
        assert data_fingerprint(getattr(staged, split)) == data_fingerprint(getattr(full, split))

    part = data_dir / sorted(manifest["files"])[2]  # part 1: test-..., then the head part train-00000-...
    part.write_bytes(part.read_bytes()[:-1])
    checked = gpu_zoo.check_data(data_dir, "train")
    assert not checked["ready"] and checked["corrupt"] == [str(part)]
    assert gpu_zoo.check_data(data_dir, "eval")["ready"]  # the test rows and the head part: enough to evaluate


def test_a_child_past_its_time_is_interrupted(gpu_zoo):
    code, timed_out = gpu_zoo.run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1, dict(os.environ))
    assert timed_out and code != 0


def _tiny_model_folder(folder: Path) -> Path:
    import timm

    from sglr_zoo.models import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(timm.create_model("preactresnet_tiny_cifar", num_classes=10), folder,
                           label_names=[str(k) for k in range(10)])


def test_weight_shards_join_to_the_same_file_and_load_with_huggingface_hub(gpu_zoo, tmp_path):
    import timm
    from huggingface_hub import load_torch_model

    from sglr_zoo.models import load_pretrained

    folder = _tiny_model_folder(tmp_path / "model")
    index = gpu_zoo.split_weights(folder, tmp_path / "shards", max_shard=10_000, file_limit=20_000)
    shards = sorted((tmp_path / "shards").glob("model-*.safetensors"))
    assert len(shards) >= 4 and all(p.stat().st_size < 20_000 for p in shards)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    joined = gpu_zoo.join_shards(tmp_path / "shards", tmp_path / "joined")
    assert joined["same_file"] and joined["sha256"] == gpu_zoo._sha256(folder / "model.safetensors")
    original, rebuilt = load_pretrained(f"local-dir:{folder}"), load_pretrained(f"local-dir:{tmp_path / 'joined'}")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), rebuilt.state_dict().values()))
    direct = timm.create_model("preactresnet_tiny_cifar", num_classes=10)
    load_torch_model(direct, tmp_path / "shards", strict=True)  # huggingface_hub reads the shards as they are
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), direct.state_dict().values()))

    with pytest.raises(gpu_zoo.UserError, match="not under"):
        gpu_zoo.split_weights(folder, tmp_path / "big", max_shard=10_000, file_limit=5_000)
    shards[1].write_bytes(shards[1].read_bytes()[:-1] + b"\0")
    with pytest.raises(gpu_zoo.UserError, match=shards[1].name):
        gpu_zoo.join_shards(tmp_path / "shards", tmp_path / "again")


def _machine(root: Path) -> Path:
    """A bare copy of the repository, as the device tool sends it: the code, no runs, no data."""
    root.mkdir(parents=True)
    for name in ("benchmarks", "recipes", "sglr_zoo"):
        (root / name).symlink_to(REPO / name)
    return root


def _carry(here: Path, machine: Path, paths: list[str]) -> None:
    for path in paths:
        (machine / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(here / path, machine / path)


def _call(machine: Path, out: Path, **env: str) -> str:
    """One device call of `bash benchmarks/gpu_session.sh zoo`, at toy scale; $OUT starts empty."""
    out.mkdir(parents=True)
    environment = {**os.environ, "OUT": str(out), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "OMP_NUM_THREADS": "1", "ZOO_SET": ZOO_SET, "AA_N": str(AA_N), "SHARD_MIB": "0.012",
                   "ZOO_FILE_MIB": "0.02", "ZOO_RETURN_FILES": str(RETURN_FILES),
                   "ZOO_BUDGET": "3000", **env}  # a busy machine stretches the toy's seconds: no step may be cut
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "zoo"], cwd=machine, env=environment,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= RETURN_FILES and all(p.stat().st_size < 16 * 2**20 for p in files)  # the toy's return limits
    assert all(p.stat().st_size < 0.02 * 2**20 for p in files if p.suffix == ".safetensors")
    return done.stdout


def _status(log: str) -> dict:
    return json.loads(log.split("zoo status: ")[-1].splitlines()[0])


MARK_S = 12345.0  # the first sub-attack's seconds in an edited state file: a resumed AutoAttack keeps them


def _kill_autoattack(state_path: Path) -> str:
    """Makes a state file look like that of an AutoAttack killed before its last sub-attack; the first one's seconds
    become MARK_S, which a resumed evaluation reports and a restarted one would not. Returns the first's name."""
    state = json.loads(state_path.read_text())
    first, *_, last = state["per_attack"]
    for key in ("attacked", "per_attack", "seconds"):
        state[key].pop(last, None)
    state["per_attack"][first]["seconds"] = MARK_S
    state_path.write_text(json.dumps(state))
    return first


@pytest.mark.slow
def test_zoo_stage_stages_trains_returns_shards_and_resumes(gpu_zoo, tiny_dataset, tmp_path):
    here, machine, name = tmp_path / "here", _machine(tmp_path / "device"), "prn18_cifar10_fast"
    data_dir = gpu_zoo.DATA_ROOT / gpu_zoo.DATASET
    manifest = gpu_zoo.stage_data(tiny_dataset, here / data_dir, room=110_000, val_size=16, n_test=16, head_rows=8)
    calls = [[str(Path(p).relative_to(here)) for p in call] for call in gpu_zoo.carry_plan(manifest, here / data_dir)]
    assert len(calls) >= 3 and all(sum((here / p).stat().st_size for p in call) <= 110_000 for call in calls)

    _carry(here, machine, calls[0])
    log = _call(machine, tmp_path / "out1")  # staging: nothing trains before every part has arrived
    assert _status(log)["stage"] == "staging" and not (machine / "runs" / "gpu" / name).exists()
    for call in calls[1:]:
        _carry(here, machine, call)

    log = _call(machine, tmp_path / "out2")  # trains, splits, returns 3 of the shards, AutoAttack
    status = _status(log)
    assert status["stage"] == "returning" and len(status["shards"]["files"]) in (4, 5, 6)
    assert len(status["shards"]["left"]) == len(status["shards"]["files"]) - 3
    assert status["results_trainer"]["n"] == 16 and {"clean", "pgd20"} <= set(status["results_trainer"])
    assert status["results"]["n"] == AA_N and {"clean", "pgd20", "autoattack"} <= set(status["results"])
    results = machine / gpu_zoo.WORKS / name / f"results_n{AA_N}.json"
    written = results.stat().st_mtime_ns

    log = _call(machine, tmp_path / "out3")  # the rest of the shards; nothing is trained or evaluated again
    assert _status(log)["stage"] == "done" and results.stat().st_mtime_ns == written
    assert " train recipes/" not in log and " eval runs/" not in log

    for out in (tmp_path / "out2", tmp_path / "out3"):
        reports = gpu_zoo.receive(out, here, aa_n=AA_N)
    (report,) = reports
    trained = machine / "runs" / "gpu" / name / "last" / "model.safetensors"
    assert not report["missing"] and report["join"]["same_file"]
    assert report["join"]["sha256"] == gpu_zoo._sha256(trained)
    restored = here / "runs" / "gpu" / name / "last" / "model.safetensors"
    assert report["restored"] and gpu_zoo._sha256(restored) == gpu_zoo._sha256(trained)
    received = json.loads((here / gpu_zoo.WORKS / name / f"results_n{AA_N}.json").read_text())
    assert received["n_examples"] == AA_N and {"pgd20", "autoattack"} <= set(received["robust_accuracy"])
    assert received["weights_sha256"] == report["join"]["weights_fingerprint"]

    # A killed AutoAttack resumes from its state file: the sub-attacks it finished are not run again.
    results.unlink()
    first = _kill_autoattack(machine / gpu_zoo.WORKS / name / f"autoattack_state_n{AA_N}.json")
    log = _call(machine, tmp_path / "out4")
    again = json.loads(results.read_text())
    assert " eval runs/" in log and again["autoattack_per_attack"][first]["seconds"] == MARK_S
    assert again["robust_accuracy"] == received["robust_accuracy"] and len(again["autoattack_per_attack"]) == 4

    # A later session: a fresh machine gets the test rows, the shards and the state file; AutoAttack resumes there.
    work = gpu_zoo.Work(here / gpu_zoo.WORKS / name, AA_N)
    work.results.unlink()
    first = _kill_autoattack(work.state)
    fresh = _machine(tmp_path / "device2")
    plan = gpu_zoo.resume_plan(work, here, room=110_000)
    assert all(sum((here / p).stat().st_size for p in call) <= 110_000 for call in plan)
    _carry(here, fresh, plan[0])
    log = _call(fresh, tmp_path / "out5")
    assert _status(log)["stage"] in ("carrying weights", "evaluating") or len(plan) == 1
    for call in plan[1:]:
        _carry(here, fresh, call)
    log = _call(fresh, tmp_path / "out6")
    status = _status(log)
    assert status["mode"] == "evaluation only" and status["stage"] == "done"
    assert not list((tmp_path / "out6").rglob("*.safetensors"))  # the shards came from here
    gpu_zoo.receive(tmp_path / "out6", here, aa_n=AA_N)
    resumed = json.loads(work.results.read_text())
    assert resumed["autoattack_per_attack"][first]["seconds"] == MARK_S
    assert resumed["robust_accuracy"] == received["robust_accuracy"] and len(resumed["autoattack_per_attack"]) == 4
