"""Evaluation: every attack on tiny models, sanity checks, AutoAttack resume, the results file and `sglr-zoo eval`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import threading
from fractions import Fraction
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from torch import nn

from sglr_zoo import autoattack, sanity
from sglr_zoo import evaluate as ev
from sglr_zoo.attacks import pgd
from sglr_zoo.cli import main
from sglr_zoo.errors import UserError
from sglr_zoo.models import create_model, save_pretrained
from sglr_zoo.outcomes import Outcomes
from sglr_zoo.results import SCHEMA, AttackStep, Provenance, Results

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


class LinearNet(nn.Module):
    """A linear classifier with BatchNorm: AutoAttack runs in a blink, eps 1/255 flips some of its answers, and
    being affine in eval mode its exact robust accuracy can be computed (`exact_robust`)."""

    def __init__(self, num_classes: int = 10, quantize: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 32 * 32, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)
        self.quantize = quantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize:
            x = torch.round(x * 4) / 4  # gradient masking: the input gradient is zero
        return self.bn(self.fc(x.flatten(1)))


class TupleNet(LinearNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)
        return logits, logits.softmax(1)


def _data(model: nn.Module, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled with the model's own answers, a quarter of them wrong (clean accuracy 75%)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=generator)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    return x, y


def exact_robust(model: LinearNet, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Per example, whether no image in the L-inf ball (within [0, 1]) changes the answer of the eval-mode affine
    model: for each other class, the worst pixel of the box for the margin is its lower or upper end."""
    bn = model.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight, bias = model.fc.weight * scale[:, None], (model.fc.bias - bn.running_mean) * scale + bn.bias
    flat = x.flatten(1)
    low, high = (flat - eps).clamp(0, 1), (flat + eps).clamp(0, 1)
    robust = []
    with torch.no_grad():
        for i, label in enumerate(y.tolist()):
            v = weight[label] - weight
            margins = bias[label] - bias + torch.where(v > 0, v * low[i], v * high[i]).sum(1)
            margins[label] = float("inf")
            robust.append(bool((margins > 0).all()) and int(model.eval()(x[i:i + 1]).argmax()) == label)
    return torch.tensor(robust)


def test_autoattack_standard_settings():
    aa = ev.make_autoattack(LinearNet(), threat="linf", eps=8 / 255, version="standard")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (aa.norm, aa.epsilon, aa.version) == ("Linf", 8 / 255, "standard")
    assert (aa.apgd.n_iter, aa.apgd.n_restarts) == (100, 1)
    assert (aa.apgd_targeted.n_iter, aa.apgd_targeted.n_restarts, aa.apgd_targeted.n_target_classes) == (100, 1, 9)
    assert (aa.fab.n_iter, aa.fab.n_restarts, aa.fab.n_target_classes) == (100, 1, 9)
    assert aa.square.n_queries == 5000
    settings = ev.autoattack_settings(aa)
    assert settings["implementation"] == f"pyautoattack {autoattack.PYAUTOATTACK_VERSION}"
    assert settings["sub_attacks"]["apgd-t"] == {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9}
    assert settings["sub_attacks"]["square"]["n_queries"] == 5000
    rand = ev.make_autoattack(LinearNet(), threat="l2", eps=0.5, version="rand")
    assert (rand.norm, rand.attacks_to_run, rand.apgd.eot_iter) == ("L2", ["apgd-ce", "apgd-dlr"], 20)


def test_pyautoattack_is_pinned_to_the_version_the_driver_reads(monkeypatch):
    pins = re.findall(r'"(pyautoattack[^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [f"pyautoattack=={autoattack.PYAUTOATTACK_VERSION}"]
    assert package_version("pyautoattack") == autoattack.PYAUTOATTACK_VERSION
    monkeypatch.setattr(autoattack, "package_version", lambda name: "0.3.0")
    with pytest.raises(UserError, match=r"pyautoattack 0\.3\.0 is installed.*pip install pyautoattack==0\.2\.0"):
        ev.make_autoattack(LinearNet(), threat="linf", eps=8 / 255)


@pytest.mark.parametrize("version, attacks", [("standard", ["apgd-ce"]), ("custom", None), ("custom", ["pgd"])])
def test_autoattack_bad_options(version, attacks):
    with pytest.raises(UserError, match="AutoAttack"):
        ev.make_autoattack(LinearNet(), threat="linf", eps=8 / 255, version=version, attacks=attacks)


@pytest.mark.slow
def test_every_attack_reaches_the_exact_robust_accuracy_of_a_linear_model():
    model = LinearNet().train()
    x, y = _data(model)
    exact = 100 * exact_robust(model, x, y, 1 / 255).float().mean().item()
    model.train()
    results = ev.evaluate(model, x, y, eps="1/255", num_classes=10, batch_size=8,
                          provenance=Provenance(command="test"))
    assert model.training and model.bn.training  # modes restored afterwards
    assert results.clean_accuracy == 75.0
    assert 0 < exact < results.clean_accuracy  # some points are provably robust, some breakable
    # No attack can break a provably robust point, and on an affine model every one finds the others.
    assert results.robust_accuracy == {"pgd20": exact, "cw20": exact, "autoattack": exact}
    assert results.worst_case_accuracy == exact
    per_attack = results.autoattack_per_attack
    assert list(per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(step.seconds > 0 for step in per_attack.values())  # points survived to every sub-attack
    assert results.attacks["pgd20"]["step_size"] == "1/1020" and results.eps == "1/255"
    assert results.attacks["autoattack"]["version"] == "standard"
    assert {name: check.passed for name, check in results.sanity.items()} == {
        "eval_mode": True, "input_gradients": True, "autoattack_le_pgd": True, "large_eps": True,
        "square_vs_white_box": True}
    assert Results.from_dict(json.loads(json.dumps(results.to_dict()))) == results  # plain JSON, read back whole
    assert "sanity checks:" in ev.format_results(results)


def test_bf16_quick_attacks_match_fp32():
    model = LinearNet()
    x, y = _data(model)
    fp32 = ev.evaluate(model, x, y, attacks=["pgd5", "cw5"], eps="1/255")
    bf16 = ev.evaluate(model, x, y, attacks=["pgd5", "cw5"], eps="1/255", bf16_quick=True)
    assert bf16.robust_accuracy == fp32.robust_accuracy and fp32.robust_accuracy["cw5"] < fp32.clean_accuracy
    assert bf16.attacks["cw5"]["precision"] == "bf16 autocast (verdict fp32)"
    assert bf16.sanity["autoattack_le_pgd"].passed is None
    resnet = create_model("preactresnet_tiny_cifar", 10)  # convolutions and BatchNorm under autocast
    x, y = _data(resnet, n=8)
    assert ev.evaluate(resnet, x, y, attacks=["pgd5"], bf16_quick=True, eps="4/255").attacks["pgd5"]["step_size"] \
        == "1/255"


def test_eps_zero_gives_clean_accuracy():
    model = LinearNet()
    x, y = _data(model)
    results = ev.evaluate(model, x, y, eps=0)
    assert results.robust_accuracy == {"pgd20": 75.0, "cw20": 75.0, "autoattack": 75.0}


def test_gradient_masking_is_flagged():
    model = LinearNet(quantize=True)
    x, y = _data(model)
    results = ev.evaluate(model, x, y, attacks=["clean", "pgd20"])
    check = results.sanity["input_gradients"]
    assert check.passed is False and "16 of 16" in check.detail


def test_channels_last_images_are_accepted():
    """pyautoattack's zero-gradient check (apgd-t) calls .view() on the input gradient: channels-last crashed it."""
    model = LinearNet()
    x, y = _data(model, n=8)
    nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    channels_last = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    options = dict(attacks=["autoattack"], eps="1/255", autoattack_version="custom", autoattack_attacks=["apgd-t"])
    assert ev.evaluate(model, channels_last, y, **options).robust_accuracy == \
        ev.evaluate(model, x, y, **options).robust_accuracy


@pytest.mark.slow
def test_autoattack_resume(tmp_path, monkeypatch):
    model = LinearNet()
    x, y = _data(model)
    options = dict(attacks=["autoattack"], eps="1/255", batch_size=4, autoattack_version="custom",
                   autoattack_attacks=["apgd-ce", "apgd-t"])
    calls = []
    original = AutoAttack.run_standard_evaluation

    def counted(self, *args, **kwargs):
        calls.append(self.attacks_to_run[0])
        if interrupt_at and len(calls) == interrupt_at:
            raise KeyboardInterrupt  # a killed run
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", counted)
    interrupt_at = None
    reference = ev.evaluate(model, x, y, **options)
    total, calls[:] = len(calls), []
    per_attack = reference.autoattack_per_attack
    assert 0 < per_attack["apgd-t"].robust_accuracy <= per_attack["apgd-ce"].robust_accuracy < 75.0

    state = tmp_path / "aa_state.json"
    interrupt_at = 4  # three batches done, killed in the fourth
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, x, y, state_path=state, **options)
    assert state.is_file()
    interrupt_at, calls[:] = None, []
    resumed = ev.evaluate(model, x, y, state_path=state, **options)
    assert len(calls) == total - 3
    assert resumed.robust_accuracy == reference.robust_accuracy
    assert {k: v.robust_accuracy for k, v in resumed.autoattack_per_attack.items()} == \
        {k: v.robust_accuracy for k, v in per_attack.items()}

    calls[:] = []  # a finished state: nothing left to run
    assert ev.evaluate(model, x, y, state_path=state, **options).robust_accuracy == reference.robust_accuracy
    assert calls == []
    with pytest.raises(UserError, match="different evaluation"):
        ev.evaluate(model, x, y, state_path=state, **{**options, "eps": "2/255"})


class ScriptedAutoAttack:
    """Stands in for pyautoattack: sub-attack `name` breaks the examples in `breaks[name]` (the images carry their
    index), and the `kill_at`-th call is killed."""

    def __init__(self, breaks: dict[str, set[int]], kill_at: int | None = None):
        self.attacks_to_run, self.breaks, self.kill_at, self.calls = list(breaks), breaks, kill_at, 0

    def run_standard_evaluation(self, x, y, batch_size):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        broken = torch.tensor([int(i) in self.breaks[self.attacks_to_run[0]] for i in x[:, 0, 0, 0]])
        return x, torch.where(broken, (y + 1) % 10, y)


def test_autoattack_resume_keeps_each_sub_attacks_accuracy(tmp_path):
    """Killed in any batch, also after a later sub-attack broke some examples, the resumed run reports what an
    uninterrupted one does, sub-attack by sub-attack (a resume once rewrote the finished ones' accuracy)."""
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 2, 2)
    labels, candidates = torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool)
    breaks = {"apgd-ce": {0, 1, 2}, "apgd-t": {3, 4, 6}}
    run = partial(autoattack.run_autoattack, images=images, labels=labels, candidates=candidates, batch_size=2, key={})
    robust, per_attack = run(ScriptedAutoAttack(breaks), state_path=None)
    assert robust.tolist() == [False] * 5 + [True, False, True]
    assert {name: step.robust_accuracy for name, step in per_attack.items()} == {"apgd-ce": 62.5, "apgd-t": 25.0}
    for kill_at in range(2, 8):  # 4 batches of apgd-ce, then 3 of apgd-t
        state = tmp_path / f"state_{kill_at}.json"
        with pytest.raises(KeyboardInterrupt):
            run(ScriptedAutoAttack(breaks, kill_at), state_path=state)
        resumed = run(ScriptedAutoAttack(breaks), state_path=state)
        assert resumed[0].tolist() == robust.tolist()
        assert {k: v.robust_accuracy for k, v in resumed[1].items()} == \
            {k: v.robust_accuracy for k, v in per_attack.items()}, f"killed in call {kill_at}"


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "unreadable"),
    (lambda text: "[]", "not an AutoAttack state file"),
    (lambda text: text.replace('"robust": [', '"robust": [true, ', 1), "corrupt"),
    (lambda text: re.sub(r'"seconds": \{[^}]*\}', '"seconds": {"apgd-ce": "soon"}', text, count=1), "corrupt"),
    (lambda text: re.sub(r'"seconds": \{[^}]*\}', '"seconds": {"apgd-ce": NaN}', text, count=1), "corrupt"),
    (lambda text: re.sub(r'"seconds": \{[^}]*\}', '"seconds": {"apgd-ce": -1}', text, count=1), "corrupt"),
])
def test_corrupt_state_file(tmp_path, damage, message):
    model = LinearNet()
    x, y = _data(model, n=4)
    state = tmp_path / "aa_state.json"
    options = dict(attacks=["autoattack"], eps="1/255", autoattack_version="custom", autoattack_attacks=["apgd-ce"],
                   state_path=state)
    ev.evaluate(model, x, y, **options)
    state.write_text(damage(state.read_text()))
    with pytest.raises(UserError, match=f"{re.escape(str(state))}.*{message}.*delete"):
        ev.evaluate(model, x, y, **options)


@pytest.mark.parametrize("forge", ["robust", "per_attack"])
def test_a_forged_state_claims_no_more_than_the_clean_pass(tmp_path, forge):
    """A state file with the right key whose flags say every example resisted once reported AutoAttack 100% against
    75% clean: a sub-attack can only remove points from the clean-correct ones, so such a state is refused."""
    model = LinearNet()
    x, y = _data(model, n=8)
    state = tmp_path / "aa_state.json"
    options = dict(attacks=["autoattack"], eps="1/255", autoattack_version="custom", autoattack_attacks=["apgd-ce"],
                   state_path=state)
    assert ev.evaluate(model, x, y, **options).clean_accuracy == 75.0
    data = json.loads(state.read_text())
    if forge == "robust":
        data["robust"] = [True] * 8
    else:
        data["per_attack"]["apgd-ce"]["robust_accuracy"] = 100.0
    state.write_text(json.dumps(data))
    with pytest.raises(UserError, match=re.escape(f"AutoAttack state file {state} claims examples robust that the "
                                                  "clean pass gets wrong, or accuracies outside [") + r".*, 75\.00\]%"):
        ev.evaluate(model, x, y, **options)


@pytest.mark.parametrize("kind", ["a FIFO", "a character device"])
def test_a_state_path_that_is_no_file(tmp_path, kind):
    """A FIFO as --state-path once waited forever for a writer; /dev/zero read until memory ran out."""
    model = LinearNet()
    x, y = _data(model, n=4)
    state = tmp_path / "aa_state.json"
    os.mkfifo(state) if kind == "a FIFO" else state.symlink_to("/dev/zero")
    with pytest.raises(UserError, match=re.escape(f"{state}: not a regular file ({kind}); a state file must be")):
        ev.evaluate(model, x, y, attacks=["autoattack"], eps="1/255", autoattack_version="custom",
                    autoattack_attacks=["apgd-ce"], state_path=state)


def test_pyautoattack_cannot_resume_its_own_state(tmp_path):
    """Why we keep our own state file: pyautoattack 0.2.0 writes the attack set as a string, so never reads it back."""
    model = LinearNet()
    x, y = _data(model, n=4)
    state = tmp_path / "state.json"
    options = dict(threat="linf", eps=8 / 255, version="custom", attacks=["apgd-ce"])
    ev.make_autoattack(model, **options).run_standard_evaluation(x, y, batch_size=4, state_path=state)
    with pytest.raises(ValueError, match="different set of attacks"):
        ev.make_autoattack(model, **options).run_standard_evaluation(x, y, batch_size=4, state_path=state)


@pytest.mark.parametrize("per_attack, passed", [
    ({}, None),
    ({"square": 40.0}, None),
    ({"apgd-ce": 50.0, "apgd-t": 45.0, "square": 45.0}, True),
    ({"apgd-ce": 50.0, "apgd-t": 45.0, "square": 40.0}, False),
])
def test_square_check(per_attack, passed):
    steps = {name: AttackStep(robust_accuracy=acc, seconds=0.0) for name, acc in per_attack.items()}
    assert sanity.square_vs_white_box(steps).passed is passed


@pytest.mark.parametrize("change, message", [
    (lambda x, y: dict(images=x * 2 - 1), "range over"),
    (lambda x, y: dict(images=(x * 255).to(torch.uint8)), "to_float"),
    (lambda x, y: dict(attacks=["fgsm"]), "unknown attack"),
    (lambda x, y: dict(num_classes=12), "outputs 10 logits per image but the data has 12 classes"),
    (lambda x, y: dict(num_classes=3), r"labels range over \[2, 9\]; class indices are in \[0, 3\)"),
    (lambda x, y: dict(labels=y - 3), r"labels range over \[-1, 6\]"),
    (lambda x, y: dict(labels=y.float()), r"labels must be integer class indices of shape \(N,\), got \(4,\) "
                                          "torch.float32"),
    (lambda x, y: dict(labels=y.bool()), r"labels must be integer .*torch.bool"),
    (lambda x, y: dict(labels=y[:, None]), r"labels must be integer .*\(4, 1\) torch.int64"),
    (lambda x, y: dict(labels=y.tolist()), r"labels must be integer .*got list"),
    (lambda x, y: dict(images=torch.full_like(x, float("nan"))), "images hold NaN or infinite values"),
    (lambda x, y: dict(images=x.index_fill(0, torch.tensor([1]), float("inf"))), "images hold NaN or infinite"),
    (lambda x, y: dict(eps="5"), r"eps \(--eps\): 5 is more than 1, the whole \[0, 1\] pixel range"),
    (lambda x, y: dict(eps="56", threat="l2"), r"eps \(--eps\): 56 is more than 55.43, the diameter"),
    (lambda x, y: dict(seed=-1), r"seed -1 \(--seed\): give a whole number in \[0, 2\*\*32 - 1\]"),
    (lambda x, y: dict(seed=2**32), r"seed 4294967296 \(--seed\)"),
    (lambda x, y: dict(batch_size=0), r"batch size 0 \(--batch-size\)"),
    (lambda x, y: dict(eps="1/0"), r"eps \(--eps\).*1/0"),
    (lambda x, y: dict(eps="-1/255"), r"eps \(--eps\): must be >= 0"),
    (lambda x, y: dict(model=TupleNet()), "returns a tuple, not a logits tensor"),
])
def test_input_errors(change, message):
    model = LinearNet()
    x, y = _data(model, n=4)
    arguments = {"model": model, "images": x, "labels": y, **change(x, y)}
    with pytest.raises(UserError, match=message):
        ev.evaluate(arguments.pop("model"), arguments.pop("images"), arguments.pop("labels"), **arguments)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width(dtype):
    """Labels of another integer type are class indices all the same (int32 once failed in the attack's loss)."""
    model = LinearNet()
    x, y = _data(model, n=8)
    options = dict(eps="1/255", attacks=["clean", "pgd2"], batch_size=4)
    assert ev.evaluate(model, x, y.to(dtype), **options).robust_accuracy == \
        ev.evaluate(model, x, y, **options).robust_accuracy


def test_a_normalising_model_must_be_wrapped():
    model = LinearNet()
    x, y = _data(model, n=4)
    model.pretrained_cfg = {"architecture": "resnet18", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    with pytest.raises(UserError, match="Normalized"):
        ev.evaluate(model, x, y)


def test_old_provenance_keywords_still_work():
    model = LinearNet()
    x, y = _data(model, n=4)
    with pytest.warns(DeprecationWarning, match="provenance=sglr_zoo.results.Provenance"):
        old = ev.evaluate(model, x, y, attacks=["clean"], model_name="run/best", dataset="uoft-cs/cifar10",
                          split="test", which="first 4", command="python train.py")
    assert old.provenance == Provenance(model="run/best", dataset="uoft-cs/cifar10", split="test", which="first 4",
                                        command="python train.py")
    with pytest.raises(TypeError, match="unexpected keyword argument 'modle'"):
        ev.evaluate(model, x, y, modle="x")


def test_results_round_trip_and_no_local_paths(tmp_path):
    model = LinearNet()
    x, y = _data(model, n=4)
    results = ev.evaluate(model, x, y, attacks=["clean"], provenance=Provenance(
        model=str(tmp_path / "runs" / "test" / "best"), source=f"local-dir:{tmp_path}/data",
        command=f"sglr-zoo eval {tmp_path}/runs/test/best model.pretrained={tmp_path}/x --n 4"))
    assert results.provenance.model == "best" and results.provenance.source == "local-dir:data"
    assert results.provenance.command == "sglr-zoo eval best model.pretrained=x --n 4"
    path = ev.save_results(results, tmp_path / "out" / "results.json")
    assert str(tmp_path) not in path.read_text()
    assert ev.load_results(path) == results
    with pytest.warns(DeprecationWarning, match=r"results\.clean_accuracy"):
        assert results["clean_accuracy"] == results.clean_accuracy  # the old dict access, for one more release
    with pytest.warns(DeprecationWarning):
        assert results["model"] == "best"


def test_the_results_module_imports_no_torch():
    """Readers of results (zoo table, cards, CLI listing) need no torch: only the standard library, our errors and
    sglr_zoo.files (its checked reads and atomic writes), which imports only the standard library and our errors."""
    import ast

    import sglr_zoo.files
    import sglr_zoo.results

    def imports(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        return found | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert imports(sglr_zoo.results) == {"__future__", "json", "math", "os", "re", "warnings", "dataclasses",
                                         "pathlib", "typing", "sglr_zoo.errors", "sglr_zoo.files"}
    assert {name for name in imports(sglr_zoo.files) if name.startswith("sglr_zoo")} == {"sglr_zoo.errors"}
    assert not {name for name in imports(sglr_zoo.files) if name.split(".")[0] in ("torch", "numpy", "timm")}


def _plant(path: Path, kind: str) -> None:
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a character device":
        path.symlink_to("/dev/zero")
    elif kind == "a folder":
        path.mkdir()
    else:
        with open(path, "wb") as file:
            file.truncate(12 << 30)  # 12 GiB, no blocks on disk


@pytest.mark.parametrize("kind, message", [
    ("a FIFO", "not a regular file (a FIFO); a results file must be a plain file"),
    ("a character device", "not a regular file (a character device)"),
    ("a folder", "not a regular file (a folder)"),
    ("sparse", "12,884,901,888 bytes, more than a results file can be (16,777,216)"),
])
def test_results_file_that_is_no_plain_file(tmp_path, kind, message):
    path = tmp_path / "results.json"
    _plant(path, kind)
    with pytest.raises(UserError) as info:
        Results.load(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_concurrent_saves_to_one_path_each_leave_a_whole_file(tmp_path):
    """Two evaluations with the same --out once shared one temporary name: a third of the writes failed, and a
    reader could see an empty file."""
    model = LinearNet()
    x, y = _data(model, n=4)
    results = ev.evaluate(model, x, y, attacks=["clean"])
    path, errors, seen = tmp_path / "results.json", [], set()

    def save(seed: int) -> None:
        try:
            for _ in range(20):
                dataclasses.replace(results, seed=seed).save(path)
                seen.add(Results.load(path).seed)  # never a partial file
        except Exception as error:  # any failure is the finding, reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=save, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and seen <= {0, 1, 2, 3} and Results.load(path).seed in {0, 1, 2, 3}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_reads_a_version_1_results_file():
    """The schema moved provenance into one object (version 2), then added weights_sha256 (version 3); committed
    version-1 files still load."""
    path = REPO / "tests" / "data" / "results_v1.json"  # written by the evaluator before the schema moved
    data = json.loads(path.read_text())
    assert data["schema"] == "sglr_zoo.results/1"
    results = Results.load(path)
    assert results.provenance.model == data["model"] and results.provenance.which == data["which"]
    assert results.clean_accuracy == data["clean_accuracy"] and results.robust_accuracy == data["robust_accuracy"]
    assert results.autoattack_per_attack["square"] == AttackStep(**data["autoattack_per_attack"]["square"])
    assert results.weights_sha256 is None and results.to_dict()["schema"] == SCHEMA


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("robust_accuracy"), "missing key 'robust_accuracy'"),
    (lambda d: d.update(schema="other/9"), "schema 'other/9'"),
    (lambda d: d.update(clean_accuracy=101.0), "key 'clean_accuracy' must be a percentage"),
    (lambda d: d["robust_accuracy"].update(pgd20="high"), "robust_accuracy: key 'pgd20' must be a percentage"),
    (lambda d: d["sanity"]["eval_mode"].update(passed="yes"), "sanity: eval_mode: key 'passed' must be true or false"),
    (lambda d: d.update(threat="l1"), "key 'threat' must be 'linf' or 'l2'"),
    (lambda d: d.update(n_examples=2.5), "key 'n_examples' must be a whole number"),
    (lambda d: d.pop("provenance"), "missing key 'provenance'"),
])
def test_results_file_errors_name_the_file_and_key(tmp_path, edit, message):
    model = LinearNet()
    x, y = _data(model, n=4)
    data = ev.evaluate(model, x, y, attacks=["clean", "pgd2"]).to_dict()
    edit(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*" + message):
        ev.load_results(path)


@pytest.mark.parametrize("text, message", [("{]", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_results_file_that_is_not_an_object(tmp_path, text, message):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        ev.load_results(path)


def test_cli_eval(tmp_path, tiny_dataset, capsys):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    out = tmp_path / "results.json"
    main(["eval", str(folder), "--dataset", str(tiny_dataset), "--n", "8", "--batch-size", "4",
          "--attacks", "clean,pgd20,cw20", "--out", str(out), "--device", "cpu"])
    results = ev.load_results(out)
    assert results.arch == "preactresnet_tiny_cifar"
    assert results.n_examples == 8 and results.provenance.which == "first 8 of the split in order"
    # The paths given are outside the working directory: only their last component is recorded.
    assert results.provenance.model == "model" and results.provenance.source == tiny_dataset.name
    assert results.provenance.command == ("sglr-zoo eval model --dataset tiny_cifar --n 8 --batch-size 4 --attacks "
                                          "clean,pgd20,cw20 --out results.json --device cpu")
    assert str(tmp_path) not in out.read_text() and str(tiny_dataset.parent) not in out.read_text()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "0"], "batch size 0 (--batch-size)"),
    (["--eps", "1/0"], "eps (--eps)"),
    (["--n", "0"], "--n 0"),
    (["--attacks", "clean,fgsm"], "unknown attack 'fgsm'"),
    (["--seed", "-1"], "seed -1 (--seed): give a whole number in [0, 2**32 - 1]"),
    (["--eps", "5"], "eps (--eps): 5 is more than 1"),
])
def test_cli_eval_bad_options(tmp_path, tiny_dataset, capsys, option, message):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(folder), "--dataset", str(tiny_dataset), "--out", str(tmp_path / "r.json"), *option])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(error)
    assert error[-1].startswith("sglr-zoo eval: error: ") and message in error[-1]
    assert not (tmp_path / "r.json").exists()


def test_cli_eval_wrong_num_classes(tmp_path, tiny_dataset, capsys):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 5), tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(folder), "--dataset", str(tiny_dataset), "--n", "4", "--attacks", "clean",
              "--out", str(tmp_path / "r.json"), "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "outputs 5 logits" in error and "10 classes" in error
    assert not (tmp_path / "r.json").exists()


@pytest.mark.real_data
def test_pgd20_matches_torchattacks_on_cifar10(real_cifar10):
    """Our PGD-20 and torchattacks' agree within 1 point on 200 test images, for a briefly PGD-2-trained model."""
    import torchattacks

    from sglr_zoo.data import load_splits, to_float
    from sglr_zoo.recipe import DataConfig

    splits = load_splits(DataConfig(dataset=str(real_cifar10), n_train=10000, n_test=200))
    x_train, y_train = to_float(splits.train.images, 32), splits.train.labels
    torch.manual_seed(0)
    model = create_model("preactresnet_tiny_cifar", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(150):  # about 30 s on one CPU core
        index = torch.randint(len(y_train), (128,))
        x, y = x_train[index], y_train[index]
        x_adv = pgd(model, x, y, eps=8 / 255, step_size=4 / 255, steps=2)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    x, y = to_float(splits.test.images, 32), splits.test.labels
    ours = ev.evaluate(model, x, y, attacks=["clean", "pgd20"], num_classes=10)
    torch.manual_seed(0)
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=20, random_start=True)
    x_adv = attack(x, y)
    with torch.no_grad():
        theirs = 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()
    print(f"clean {ours.clean_accuracy:.1f}%, pgd20 ours {ours.robust_accuracy['pgd20']:.1f}%, "
          f"torchattacks {theirs:.1f}%")
    assert ours.clean_accuracy >= 20 and theirs >= 5  # the model learnt something robust
    assert abs(ours.robust_accuracy["pgd20"] - theirs) <= 1.0


@pytest.mark.slow
def test_autoattack_driver_matches_one_library_call():
    """Driving the sub-attacks batch by batch gives what a single `run_standard_evaluation` gives."""
    model = LinearNet()
    x, y = _data(model)
    ours = ev.evaluate(model, x, y, attacks=["autoattack"], eps="1/255", batch_size=8)
    aa = ev.make_autoattack(model.eval(), threat="linf", eps=float(Fraction(1, 255)), version="standard")
    _, predicted = aa.run_standard_evaluation(x, y, batch_size=8)
    library = 100 * (predicted == y).float().mean().item()
    assert ours.robust_accuracy["autoattack"] == pytest.approx(library)


@pytest.mark.slow
def test_autoattack_on_fewer_than_ten_classes():
    """AutoAttack's targeted attacks default to 9 target classes; with 5 classes they must target the 4 others."""
    torch.manual_seed(0)
    model = create_model("preactresnet_tiny_cifar", 5).eval()
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6) % 5
    results = ev.evaluate(model, images, labels, attacks=["clean", "autoattack"], num_classes=5)
    subs = results.attacks["autoattack"]["sub_attacks"]
    assert subs["apgd-t"]["n_target_classes"] == subs["fab-t"]["n_target_classes"] == 4
    # the clean-correct point reaches every sub-attack: the targeted ones ran with 4 targets instead of failing
    assert results.clean_accuracy > 0 and all(step.seconds > 0 for step in results.autoattack_per_attack.values())


@pytest.mark.slow
def test_channels_last_model_gives_the_same_results():
    """for_evaluation's channels_last (CPU) changes how oneDNN sums, not what the attacks see: the same logits and
    input gradients to float rounding, and AutoAttack's gradient attacks (whose checks call .view() on input
    gradients) run on it."""
    torch.manual_seed(0)
    model = create_model("preactresnet_tiny_cifar", 10).eval()
    x, y = _data(model, n=8)
    x.requires_grad_(True)
    logits = model(x)
    gradient, = torch.autograd.grad(F.cross_entropy(logits, y), x)
    converted = ev.for_evaluation(copy.deepcopy(model), "cpu")
    assert next(p for p in converted.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    fast_logits = converted(x)
    fast_gradient, = torch.autograd.grad(F.cross_entropy(fast_logits, y), x)
    torch.testing.assert_close(fast_logits, logits)
    torch.testing.assert_close(fast_gradient, gradient, rtol=1e-4, atol=1e-9)
    options = dict(attacks=["clean", "pgd5", "autoattack"], autoattack_version="custom",
                   autoattack_attacks=["apgd-ce", "apgd-t"])
    assert ev.evaluate(converted, x.detach(), y, **options).robust_accuracy == \
        ev.evaluate(model, x.detach(), y, **options).robust_accuracy


def test_eps_sweep_falls_to_zero_and_its_area_is_the_mean_accuracy():
    """Accuracy against eps under PGD on the affine model: clean at 0, never below the exact robust accuracy, 0 at
    a large one; the expected robustness is the trapezoid area over the largest radius; it reads back from JSON."""
    model = LinearNet()
    x, y = _data(model)
    results = ev.evaluate(model, x, y, attacks=["clean"], eps_sweep=["64/255", "1/510", "1/255"], sweep_attack="pgd20")
    sweep, a = results.eps_sweep, results.eps_sweep.accuracy
    assert sweep.eps == ["0", "1/510", "1/255", "64/255"] and sweep.attack == "pgd20"
    exact = [100 * exact_robust(model, x, y, eps).float().mean().item() for eps in (1 / 510, 1 / 255)]
    assert a[0] == results.clean_accuracy == 75.0 and a[3] == 0
    assert a[1] >= exact[0] and a[2] == pytest.approx(exact[1])  # never below the exact value; at 1/255 PGD-20 finds it
    assert a[0] > a[1] > a[2] >= a[3]
    assert sweep.expected_robustness == pytest.approx((a[0] + 2 * a[1] + 127 * a[2] + 126 * a[3]) / 4 / 64)
    assert Results.from_dict(json.loads(json.dumps(results.to_dict()))).eps_sweep == sweep


@pytest.mark.parametrize("radii, attack, message", [
    (["2/255", "x"], "pgd5", "--eps-sweep: "), (["2"], "pgd5", "--eps-sweep: 2: "), (["1/255"], "clean", "clean"),
    (["1/255"], "fgsm", "unknown attack 'fgsm'")])
def test_bad_eps_sweeps_are_one_line(radii, attack, message):
    model = create_model("preactresnet_tiny_cifar", 10).eval()
    with pytest.raises(UserError, match=message):
        ev.evaluate(model, torch.rand(2, 3, 32, 32), torch.arange(2), attacks=["clean"], eps_sweep=radii,
                    sweep_attack=attack)


def test_cli_eval_writes_outcomes_and_an_eps_sweep_and_compare_reads_them(tmp_path, tiny_dataset, capsys):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    runs = []
    for name, extra in (("a", ["--eps-sweep", "2/255,8/255", "--sweep-attack", "pgd2"]), ("b", [])):
        out = tmp_path / name / "results.json"
        main(["eval", str(folder), "--dataset", str(tiny_dataset), "--n", "8", "--batch-size", "4",
              "--attacks", "clean,pgd2", "--out", str(out), "--device", "cpu", *extra])
        runs.append(out)
    assert Outcomes.load(runs[0].parent / "results.outcomes.json").n_examples == 8
    assert (runs[0].parent / "results.eps_sweep.png").read_bytes().startswith(b"\x89PNG")
    assert ev.load_results(runs[0]).eps_sweep.eps == ["0", "2/255", "8/255"]
    assert ev.load_results(runs[1]).eps_sweep is None and not (runs[1].parent / "results.eps_sweep.png").exists()
    capsys.readouterr()
    main(["compare", str(runs[0].parent / "results.outcomes.json"), str(runs[1].parent / "results.outcomes.json")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" on ")[0] for line in lines] == ["clean", "pgd2"]
    assert all("only A correct on 0, only B on 0; McNemar's exact p = 1" in line for line in lines)  # same model
