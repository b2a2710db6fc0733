"""Sharded evaluation: 2 gloo processes give the single process's outcomes and accuracies, also after a kill."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import sglr_zoo.evaluate as ev
from sglr_zoo.errors import UserError
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.sharding import TIMEOUT_ENV, Shards, group_timeout, process_group
from tests.test_training import free_port, subprocess_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# Evaluates a linear model with BatchNorm (AutoAttack runs in a blink) on 40 images labelled with its own answers, a
# quarter of them wrong, in batches of 4: 8 PGD batches, some AutoAttack rounds of 2. The main process writes
# OUT (results), its outcomes and STATE; with KILL > 0 it dies (os._exit) after writing STATE KILL times.
DRIVER = """
import os, sys

import torch
from torch import nn

import sglr_zoo.autoattack as autoattack
from sglr_zoo.evaluate import evaluate
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.sharding import process_group

out, state, kill = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.BatchNorm1d(10)).eval()
x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    y = model(x).argmax(1)
y[::4] = (y[::4] + 1) % 10
write_state, writes = autoattack._write_state, []


def killed(path, saved):
    write_state(path, saved)
    writes.extend([path] if path else [])
    if kill and len(writes) == kill:
        os._exit(3)


autoattack._write_state = killed
with process_group() as shards:
    results = evaluate(model, x, y, eps="1/255", attacks=["clean", "pgd5", "cw5", "autoattack"], batch_size=4,
                       autoattack_version="custom", autoattack_attacks=["apgd-ce", "apgd-t"], state_path=state,
                       outcomes_path=Outcomes.beside(out), eps_sweep=["1/255", "4/255"], sweep_attack="pgd5",
                       shards=shards)
if shards.main:
    results.save(out)
"""
TIMING = {"wall_time_s", "attack_seconds", "created", "device"}


def measured(results: Path) -> dict:
    """The results without timings and device strings; per sub-attack, its accuracy only."""
    data = {k: v for k, v in json.loads(results.read_text()).items() if k not in TIMING}
    data["autoattack_per_attack"] = {k: v["robust_accuracy"] for k, v in data["autoattack_per_attack"].items()}
    return data


def launch(driver: Path, out: Path, state: Path, kill: int = 0, processes: int = 1) -> subprocess.Popen:
    command = [str(driver), str(out), str(state), str(kill)]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), *command]
    return subprocess.Popen([sys.executable, *command], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out.decode()[-3000:]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results_and_resume_a_kill(tmp_path):
    """torchrun, 2 CPU processes (gloo), killed in AutoAttack and rerun with the same state file, against one
    process: the same results (timings and device aside), outcomes file and AutoAttack state."""
    (driver := tmp_path / "driver.py").write_text(DRIVER)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = launch(driver, one / "r.json", one / "aa.json")
    code, log = finish(launch(driver, two / "r.json", two / "aa.json", kill=2, processes=2))
    assert code != 0, log
    assert not (two / "r.json").exists()
    partial = json.loads((two / "aa.json").read_text())
    assert partial["attacked"]["apgd-ce"].count(True) == 16  # two rounds of 2 batches of 4, then the kill
    code, log = finish(launch(driver, two / "r.json", two / "aa.json", processes=2))
    assert code == 0, log
    code, log = finish(single)
    assert code == 0, log

    reference = measured(one / "r.json")
    assert measured(two / "r.json") == reference
    assert 0 < reference["robust_accuracy"]["autoattack"] < reference["robust_accuracy"]["pgd5"] < 75.0
    assert reference["eps_sweep"]["accuracy"][0] > reference["eps_sweep"]["accuracy"][1]
    assert Outcomes.load(two / "r.outcomes.json") == Outcomes.load(one / "r.outcomes.json")
    states = [json.loads((run / "aa.json").read_text()) for run in (one, two)]
    assert [{k: s[k] for k in ("key", "robust", "attacked")} for s in states] == \
        [{k: states[0][k] for k in ("key", "robust", "attacked")}] * 2


@dataclass(frozen=True)
class Recorded(Shards):
    """A process of a sharded run whose gather returns what the process itself wrote, and records it."""

    written: list = field(default_factory=list)

    def gather(self, values: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        self.written.append((values.clone(), owned.clone()))
        return values


@pytest.mark.parametrize("threat", ["linf", "l2"])
def test_each_process_draws_its_batches_random_starts_as_one_process_does(threat):
    """Our PGD run as rank 0 and rank 1 of 3: their batches' flags are the single process's (the random starts of
    the batches a process skips are drawn all the same)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1).detach()
    eps = ev.check_options(threat, None, [], 4)[0] / 4  # a mix of broken and robust points

    def attack(shards: Shards) -> torch.Tensor:
        torch.manual_seed(0)
        return ev._quick_attack(model, x, y, torch.ones(30, dtype=torch.bool), loss="ce", steps=3, threat=threat,
                                eps=eps, batch_size=4, device=torch.device("cpu"), bf16=False, progress=False,
                                desc="pgd3", shards=shards)

    single = attack(Shards())
    assert 0 < single.sum() < 30
    for rank in range(3):
        attack(shard := Recorded(rank, 3))
        (values, owned), = shard.written
        assert owned.tolist() == [(i // 4) % 3 == rank for i in range(30)]
        assert torch.equal(values[owned], single[owned])


def test_a_single_process_opens_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as shards:
        assert shards == Shards() and not torch.distributed.is_initialized()
    assert [[int(b) for b in r] for r in Shards(1, 2).rounds(list(torch.arange(5)))] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(("value", "timeout"), [(None, timedelta(hours=24)), ("90", timedelta(seconds=90))])
def test_process_group_timeout(monkeypatch, value, timeout):
    if value is None:
        monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(TIMEOUT_ENV, value)
    assert group_timeout() == timeout


def test_bad_process_group_timeout(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=TIMEOUT_ENV):
        group_timeout()
