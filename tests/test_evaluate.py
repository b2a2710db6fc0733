"""Evaluation: every attack on tiny models, sanity checks, AutoAttack resume, the results JSON and `sglr-zoo eval`."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from torch import nn

from sglr_zoo import evaluate as ev
from sglr_zoo.attacks import pgd
from sglr_zoo.cli import main
from sglr_zoo.errors import UserError
from sglr_zoo.models import create_model, save_pretrained


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a busy 2-core machine: one intra-op thread is ~100x faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearNet(nn.Module):
    """A linear classifier with BatchNorm: AutoAttack runs in a blink, and eps 1/255 flips some of its answers."""

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


def _data(model: nn.Module, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled with the model's own answers, a quarter of them wrong (clean accuracy 75%)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=generator)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    return x, y


def test_autoattack_standard_settings():
    aa = ev.make_autoattack(LinearNet(), threat="linf", eps=8 / 255, version="standard")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (aa.norm, aa.epsilon, aa.version) == ("Linf", 8 / 255, "standard")
    assert (aa.apgd.n_iter, aa.apgd.n_restarts) == (100, 1)
    assert (aa.apgd_targeted.n_iter, aa.apgd_targeted.n_restarts, aa.apgd_targeted.n_target_classes) == (100, 1, 9)
    assert (aa.fab.n_iter, aa.fab.n_restarts, aa.fab.n_target_classes) == (100, 1, 9)
    assert aa.square.n_queries == 5000
    settings = ev.autoattack_settings(aa)
    assert settings["implementation"] == "pyautoattack 0.2.0"
    assert settings["sub_attacks"]["apgd-t"] == {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9}
    assert settings["sub_attacks"]["square"]["n_queries"] == 5000
    rand = ev.make_autoattack(LinearNet(), threat="l2", eps=0.5, version="rand")
    assert (rand.norm, rand.attacks_to_run, rand.apgd.eot_iter) == ("L2", ["apgd-ce", "apgd-dlr"], 20)


@pytest.mark.parametrize("version, attacks", [("standard", ["apgd-ce"]), ("custom", None), ("custom", ["pgd"])])
def test_autoattack_bad_options(version, attacks):
    with pytest.raises(UserError, match="AutoAttack"):
        ev.make_autoattack(LinearNet(), threat="linf", eps=8 / 255, version=version, attacks=attacks)


def test_every_attack():
    model = LinearNet().train()
    x, y = _data(model)
    model.train()
    results = ev.evaluate(model, x, y, eps="1/255", num_classes=10, batch_size=8, command="test")
    assert model.training and model.bn.training  # modes restored afterwards
    assert set(results) == set(ev.REQUIRED_KEYS)
    assert results["clean_accuracy"] == 75.0
    assert set(results["robust_accuracy"]) == {"pgd20", "cw20", "autoattack"}
    assert all(0 <= acc <= results["clean_accuracy"] for acc in results["robust_accuracy"].values())
    assert results["worst_case_accuracy"] <= min(results["robust_accuracy"].values())
    per_attack = results["autoattack_per_attack"]
    assert list(per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(step["seconds"] > 0 for step in per_attack.values())  # points survived to every sub-attack
    assert results["attacks"]["pgd20"]["step_size"] == "1/1020" and results["eps"] == "1/255"
    assert results["attacks"]["autoattack"]["version"] == "standard"
    assert results["versions"]["pyautoattack"] == "0.2.0"
    assert {name: check["passed"] for name, check in results["sanity"].items()} == {
        "eval_mode": True, "input_gradients": True, "autoattack_le_pgd": True, "large_eps": True,
        "square_vs_white_box": True}
    json.dumps(results)  # plain JSON types only
    assert "sanity checks:" in ev.format_results(results)


def test_quick_attacks_on_a_resnet_with_bf16():
    model = create_model("preactresnet_tiny_cifar", 10)
    x, y = _data(model, n=8)
    results = ev.evaluate(model, x, y, attacks=["pgd5", "cw5"], bf16_quick=True, eps="4/255")
    assert results["attacks"]["cw5"]["step_size"] == "1/255"
    assert all(acc <= results["clean_accuracy"] for acc in results["robust_accuracy"].values())
    assert results["sanity"]["autoattack_le_pgd"]["passed"] is None


def test_eps_zero_gives_clean_accuracy():
    model = LinearNet()
    x, y = _data(model)
    results = ev.evaluate(model, x, y, eps=0)
    assert results["robust_accuracy"] == {"pgd20": 75.0, "cw20": 75.0, "autoattack": 75.0}


def test_gradient_masking_is_flagged():
    model = LinearNet(quantize=True)
    x, y = _data(model)
    results = ev.evaluate(model, x, y, attacks=["clean", "pgd20"])
    check = results["sanity"]["input_gradients"]
    assert check["passed"] is False and "16 of 16" in check["detail"]


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
    per_attack = reference["autoattack_per_attack"]
    assert 0 < per_attack["apgd-t"]["robust_accuracy"] <= per_attack["apgd-ce"]["robust_accuracy"] < 75.0

    state = tmp_path / "aa_state.json"
    interrupt_at = 4  # three batches done, killed in the fourth
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, x, y, state_path=state, **options)
    assert state.is_file()
    interrupt_at, calls[:] = None, []
    resumed = ev.evaluate(model, x, y, state_path=state, **options)
    assert len(calls) == total - 3
    assert resumed["robust_accuracy"] == reference["robust_accuracy"]
    assert {k: v["robust_accuracy"] for k, v in resumed["autoattack_per_attack"].items()} == \
        {k: v["robust_accuracy"] for k, v in per_attack.items()}

    calls[:] = []  # a finished state: nothing left to run
    assert ev.evaluate(model, x, y, state_path=state, **options)["robust_accuracy"] == reference["robust_accuracy"]
    assert calls == []
    with pytest.raises(UserError, match="different evaluation"):
        ev.evaluate(model, x, y, state_path=state, **{**options, "eps": "2/255"})


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
    steps = {name: {"robust_accuracy": acc, "seconds": 0.0} for name, acc in per_attack.items()}
    assert ev._check_square(steps)["passed"] is passed


def test_input_errors():
    model = LinearNet()
    x, y = _data(model, n=4)
    with pytest.raises(UserError, match=r"range over"):
        ev.evaluate(model, x * 2 - 1, y)
    with pytest.raises(UserError, match="to_float"):
        ev.evaluate(model, (x * 255).to(torch.uint8), y)
    with pytest.raises(UserError, match="unknown attack"):
        ev.evaluate(model, x, y, attacks=["fgsm"])
    with pytest.raises(UserError, match="3 classes"):
        ev.evaluate(model, x, y, num_classes=3)
    model.pretrained_cfg = {"architecture": "resnet18", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    with pytest.raises(UserError, match="Normalized"):
        ev.evaluate(model, x, y)


def test_results_round_trip_and_schema_errors(tmp_path):
    model = LinearNet()
    x, y = _data(model, n=4)
    results = ev.evaluate(model, x, y, attacks=["clean"], command="sglr-zoo eval test")
    path = ev.save_results(results, tmp_path / "out" / "results.json")
    assert ev.load_results(path) == results
    del results["robust_accuracy"]
    ev.save_results(results, path)
    with pytest.raises(UserError, match=r"results\.json.*missing key 'robust_accuracy'"):
        ev.load_results(path)
    ev.save_results({**results, "robust_accuracy": {}, "schema": "other/9"}, path)
    with pytest.raises(UserError, match="schema 'other/9'"):
        ev.load_results(path)
    path.write_text("{]")
    with pytest.raises(UserError, match="not valid JSON"):
        ev.load_results(path)


def test_cli_eval(tmp_path, tiny_dataset, capsys):
    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    out = tmp_path / "results.json"
    main(["eval", str(folder), "--dataset", str(tiny_dataset), "--n", "8", "--batch-size", "4",
          "--attacks", "clean,pgd20,cw20", "--out", str(out), "--device", "cpu"])
    results = ev.load_results(out)
    assert results["model"] == str(folder) and results["arch"] == "preactresnet_tiny_cifar"
    assert results["n_examples"] == 8 and results["which"] == "first 8 of the split in order"
    assert results["command"].startswith("sglr-zoo eval ") and results["source"] == str(tiny_dataset)
    assert "wrote" in capsys.readouterr().out


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
    print(f"clean {ours['clean_accuracy']:.1f}%, pgd20 ours {ours['robust_accuracy']['pgd20']:.1f}%, "
          f"torchattacks {theirs:.1f}%")
    assert ours["clean_accuracy"] >= 20 and theirs >= 5  # the model learnt something robust
    assert abs(ours["robust_accuracy"]["pgd20"] - theirs) <= 1.0


def test_autoattack_driver_matches_one_library_call():
    """Driving the sub-attacks batch by batch gives what a single `run_standard_evaluation` gives."""
    model = LinearNet()
    x, y = _data(model)
    ours = ev.evaluate(model, x, y, attacks=["autoattack"], eps="1/255", batch_size=8)
    aa = ev.make_autoattack(model.eval(), threat="linf", eps=float(Fraction(1, 255)), version="standard")
    _, predicted = aa.run_standard_evaluation(x, y, batch_size=8)
    library = 100 * (predicted == y).float().mean().item()
    assert ours["robust_accuracy"]["autoattack"] == pytest.approx(library)
