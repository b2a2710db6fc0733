"""Typed recipes: YAML round trip, exact fractions, overrides, and errors that name the file and the key."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from sglr_zoo.errors import UserError
from sglr_zoo.recipe import Recipe, format_fraction, from_dict, load_recipe, parse_fraction, save_recipe

REPO = Path(__file__).resolve().parents[1]

SAMPLE = """\
data:
  dataset: some/where
  n_train: 100
  val_size: 10
model:
  arch: wrn_tiny_cifar
  mean: [0.4914, 0.4822, 0.4465]
  std: [0.2471, 0.2435, 0.2616]
  kwargs: {drop_path_rate: 0.1}
attack:
  eps: 8/255
  step_size: 2/255
method:
  name: sglr
  start_epoch: 0.45
schedule:
  epochs: 20
  milestones: [10, 15]
run:
  seed: 3
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, SAMPLE))
    assert recipe.model.arch == "wrn_tiny_cifar"
    assert recipe.run.name == "recipe"  # the file's stem when not given
    assert from_dict(recipe.to_dict()) == recipe
    saved = tmp_path / "saved.yaml"
    save_recipe(recipe, saved)
    assert load_recipe(saved) == recipe


def test_eps_is_an_exact_fraction(tmp_path):
    recipe = load_recipe(write(tmp_path, SAMPLE))
    assert recipe.attack.eps == Fraction(8, 255) and isinstance(recipe.attack.eps, Fraction)
    assert recipe.attack.step_size == Fraction(2, 255)
    saved = tmp_path / "saved.yaml"
    save_recipe(recipe, saved)
    assert "eps: 8/255" in saved.read_text()
    assert yaml.safe_load(saved.read_text())["attack"]["eps"] == "8/255"


@pytest.mark.parametrize("value, expected", [
    ("8/255", Fraction(8, 255)),
    ("8 / 255", Fraction(8, 255)),
    (0.5, Fraction(1, 2)),
    (0.1, Fraction(1, 10)),
    (2, Fraction(2)),
    ("0.25", Fraction(1, 4)),
    (Fraction(3, 7), Fraction(3, 7)),
])
def test_parse_fraction(value, expected):
    assert parse_fraction(value) == expected


@pytest.mark.parametrize("value", [True, None, "eight", [1], "1/0x"])
def test_parse_fraction_rejects(value):
    with pytest.raises(ValueError):
        parse_fraction(value)


@pytest.mark.parametrize("value, expected", [
    (Fraction(8, 255), "8/255"),
    (Fraction(1, 2), 0.5),
    (Fraction(3), 3),
    (Fraction(1, 3), "1/3"),
    (Fraction(3, 255), "3/255"),
])
def test_format_fraction(value, expected):
    assert format_fraction(value) == expected


@given(st.fractions(max_denominator=10**30))
@example(Fraction(2**60 + 1, 2**61))  # rounds to the float 0.5
@example(Fraction(10**17 + 1, 10**18))  # rounds to the float 0.1
def test_format_fraction_is_exact_through_yaml(value):
    written = yaml.safe_load(yaml.safe_dump({"eps": format_fraction(value)}))["eps"]
    assert parse_fraction(written) == value


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, SAMPLE)
    recipe = load_recipe(path, ["schedule.epochs=3", "schedule.milestones=[2]", "attack.eps=4/255",
                                "model.kwargs={img_size: 32}", "run.name=quick"])
    assert recipe.schedule.epochs == 3
    assert recipe.schedule.milestones == [2]
    assert recipe.attack.eps == Fraction(4, 255)
    assert recipe.model.kwargs == {"img_size": 32}
    assert recipe.run.name == "quick"
    assert recipe.run.seed == 3  # untouched keys keep the file's value
    # A dotted override reaches into a dict field and keeps its other entries.
    assert load_recipe(path, ["model.kwargs.img_size=32"]).model.kwargs == {"drop_path_rate": 0.1, "img_size": 32}


@pytest.mark.parametrize("start, epochs, expected", [
    (0.45, 200, 90),  # shared/SGLR.md: 0.45 = epoch 90 of 200
    (0.5, 10, 5),
    (0, 200, 1),
    (90, 200, 90),
    (201, 200, 201),  # never refine (epochs + 1)
])
def test_start_epoch_resolves_fractions(start, epochs, expected):
    recipe = from_dict({"schedule": {"epochs": epochs, "milestones": []}, "method": {"start_epoch": start}})
    assert recipe.start_epoch == expected
    overridden = from_dict({}, [f"schedule.epochs={epochs}", "schedule.milestones=[]", f"method.start_epoch={start}"])
    assert overridden.start_epoch == expected


def test_defaults_are_valid():
    recipe = Recipe()
    assert recipe.start_epoch == 90
    assert from_dict({}) == recipe


# (name, YAML text or None for SAMPLE, overrides, fragments the message must hold besides the file)
ERRORS = [
    ("unknown top-level key", "optimizer: {lr: 0.1}\n", [], ["optimizer"]),
    ("unknown nested key", "schedule:\n  epoch: 3\n", [], ["schedule.epoch", "epochs"]),
    ("wrong type", "schedule:\n  epochs: ten\n", [], ["schedule.epochs", "'ten'"]),
    ("wrong type in list", "schedule:\n  milestones: [1, x]\n", [], ["schedule.milestones[1]"]),
    ("section not a mapping", "attack: 8/255\n", [], ["attack"]),
    ("eps < 0", "attack:\n  eps: -1/255\n", [], ["attack.eps", ">= 0"]),
    ("eps not a number", "attack:\n  eps: eight\n", [], ["attack.eps", "8/255"]),
    ("steps < 1", "attack:\n  steps: 0\n", [], ["attack.steps", ">= 1"]),
    ("lr <= 0", "optim:\n  lr: 0\n", [], ["optim.lr", "> 0"]),
    ("bad literal", "method:\n  name: foo\n", [], ["method.name", "'foo'", "'sglr'"]),
    ("start_epoch beyond epochs", "schedule:\n  epochs: 10\n  milestones: [5]\nmethod:\n  start_epoch: 50\n", [],
     ["method.start_epoch", "11"]),
    ("mean without std", "model:\n  mean: [0.5, 0.5, 0.5]\n", [], ["model.mean", "std"]),
    ("std of wrong length", "model:\n  mean: [0.5, 0.5, 0.5]\n  std: [0.2]\n", [], ["model.std"]),
    ("bad override value", None, ["schedule.epochs=ten"], ["schedule.epochs", "'ten'"]),
    ("unknown override key", None, ["schedule.epoch=3"], ["schedule.epoch"]),
]


@pytest.mark.parametrize("text, overrides, fragments", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_file_and_key(tmp_path, text, overrides, fragments):
    path = write(tmp_path, SAMPLE if text is None else text)
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  dataset: x\nschedule: [1, 2\n")
    with pytest.raises(UserError, match="malformed YAML") as info:
        load_recipe(path)
    assert str(path) in str(info.value)
    assert "line" in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match="not found") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override, fragment", [
    ("schedule.epochs", "'schedule.epochs'"),
    ("run.seed.x=1", "seed"),  # run.seed is a value in the file, not a section
])
def test_bad_override_syntax(tmp_path, override, fragment):
    with pytest.raises(UserError, match="override") as info:
        load_recipe(write(tmp_path, SAMPLE), [override])
    assert fragment in str(info.value)


RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES or [pytest.param(None, marks=pytest.mark.skip(reason="no recipes/*.yaml yet"))],
                         ids=[p.name for p in RECIPES] or ["none"])
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert from_dict(recipe.to_dict()) == recipe
