"""Typed recipes: YAML round trip, exact fractions, overrides, and errors that name the file and the key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from sglr_zoo.cli import main
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import (
    MAX_RECIPE_BYTES,
    Recipe,
    format_fraction,
    from_dict,
    load_recipe,
    parse_fraction,
    save_recipe,
)

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


@pytest.mark.parametrize("attack, evaluation, expected", [
    ({}, {}, Fraction(8, 255)),
    ({"eps": "4/255"}, {}, Fraction(4, 255)),
    ({"eps": 0}, {}, Fraction(8, 255)),  # clean training: robustness still measured at the standard radius
    ({"eps": 0, "threat": "l2"}, {}, Fraction(1, 2)),
    ({"eps": 0}, {"eps": 0}, Fraction(0)),
    ({}, {"eps": "16/255"}, Fraction(16, 255)),
])
def test_eval_eps(attack, evaluation, expected):
    assert from_dict({"attack": attack, "eval": evaluation}).eval_eps == expected


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
    ("lr <= 0", "optim:\n  lr: 0\n", [], ["optim.lr", "(0, 10]"]),
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


def _billion_laughs() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"  # ~400 bytes; 9**9 strings once expanded


# (name, file content (str or bytes), fragments the one-line message must hold besides the file)
STRICT_ERRORS = [
    ("duplicate section", "model:\n  arch: a\nschedule:\n  epochs: 3\nmodel:\n  arch: b\n",
     ["duplicate key 'model'", "line 5", "first on line 1"]),
    ("only duplicate sections", "run:\n  seed: 1\nrun:\n  seed: 2\n", ["duplicate key 'run'", "line 3"]),
    ("duplicate nested key", "run:\n  seed: 1\n  seed: 2\n", ["duplicate key 'seed'", "line 3"]),
    ("duplicate in a flow mapping", "model:\n  kwargs: {a: 1, a: 2}\n", ["duplicate key 'a'"]),
    ("anchor and alias", "run: &r\n  seed: 1\neval: *r\n", ["anchors and aliases", "line 1"]),
    ("billion laughs", _billion_laughs(), ["anchors and aliases", "line 1"]),
    ("tag", "schedule:\n  epochs: !!int '3'\n", ["tags", "line 2"]),
    ("python tag", "run:\n  name: !!python/object/apply:os.system ['true']\n", ["tags"]),
    ("number as a key", "run:\n  1: x\n", ["key '1'", "quote"]),
    ("list as a key", "? [a]\n: 1\n", ["key"]),
    ("empty file", "", ["states no recipe"]),
    ("only comments", "# a recipe\n\n# to come\n", ["states no recipe"]),
    ("empty mapping", "{}\n", ["states no recipe"]),
    ("top level is a list", "- model\n- run\n", ["top level must be a mapping", "list"]),
    ("top level is a string", "model\n", ["top level must be a mapping", "str"]),
    ("not UTF-8", "run:\n  name: caf\xe9\n".encode("latin-1"), ["not UTF-8", "byte 16"]),
    ("control character", "run:\n  name: \x01\n", ["character 0x1"]),
    ("two documents", "run: {seed: 1}\n---\nrun: {seed: 2}\n", ["malformed YAML", "single document"]),
    ("too deep", "model:\n  kwargs: {a: " + "[" * 1000 + "]" * 1000 + "}\n", ["nested more than"]),  # no RecursionError
    ("lr inf", "optim:\n  lr: .inf\n", ["optim.lr", "finite"]),
    ("lr nan", "optim:\n  lr: .nan\n", ["optim.lr", "finite"]),
    ("lr overflows", "optim:\n  lr: 1e400\n", ["optim.lr", "finite"]),
    ("eps inf", "attack:\n  eps: -.inf\n", ["attack.eps", "finite"]),
    ("eps 1/0", "attack:\n  eps: 1/0\n", ["attack.eps", "'1/0'"]),
    ("eps huge exponent", "attack:\n  eps: '1e999999'\n", ["attack.eps", "finite"]),
    ("mean nan", "model:\n  mean: [.nan, 0.5, 0.5]\n  std: [1, 1, 1]\n", ["model.mean[0]", "finite"]),
    ("kwargs nan", "model:\n  kwargs: {drop_path_rate: .NaN}\n", ["model.kwargs.drop_path_rate", "finite"]),
    ("huge integer", "run:\n  seed: " + "9" * 5000 + "\n", ["too long", "line 2"]),
    ("yes is no boolean", "data:\n  augment: yes\n", ["data.augment", "true or false", "'yes'"]),
    ("on is no boolean", "run:\n  channels_last: on\n", ["run.channels_last", "'on'"]),
    ("base missing", "base: nowhere.yaml\nrun: {seed: 1}\n", ["base file", "nowhere.yaml", "not found"]),
    ("base not a name", "base: [a.yaml]\nrun: {seed: 1}\n", ["base:", "['a.yaml']"]),
    ("base of itself", "base: recipe.yaml\nrun: {seed: 1}\n", ["leads back to", "cycle"]),
]


@pytest.mark.parametrize("content, fragments", [e[1:] for e in STRICT_ERRORS], ids=[e[0] for e in STRICT_ERRORS])
def test_strict_yaml_errors(tmp_path, content, fragments):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_billion_laughs_fails_fast(tmp_path):
    path = write(tmp_path, _billion_laughs())
    assert len(path.read_bytes()) < 450
    start = time.perf_counter()
    with pytest.raises(UserError, match="anchors and aliases"):
        load_recipe(path)
    assert time.perf_counter() - start < 0.5  # expanding it would take minutes and gigabytes


def test_size_cap(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\n" + "#" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(UserError, match=r"more than a recipe can be \(1,048,576\)") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("planted", ["recipe", "base"])
def test_a_fifo_or_device_is_refused_without_waiting(tmp_path, planted):
    """A FIFO as the recipe or its `base:` once waited forever for a writer; /dev/zero read until the cap."""
    child = write(tmp_path, "base: parent.yaml\nrun: {seed: 1}\n", "child.yaml")
    path = child if planted == "recipe" else tmp_path / "parent.yaml"
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    with pytest.raises(UserError, match=r"not a regular file \(a FIFO\); a recipe must be a plain file") as info:
        load_recipe(child)
    assert str(info.value).startswith(f"{child}: base file {path}" if planted == "base" else str(path))
    path.unlink()
    path.symlink_to("/dev/zero")
    with pytest.raises(UserError, match="a character device"):
        load_recipe(child)


# (override, the key and fragment of its one-line error): numbers far outside what any run means
OUT_OF_RANGE = [
    ("run.seed=-1", "run.seed", "[0, 2**32 - 1]"),
    ("run.seed=4294967296", "run.seed", "[0, 2**32 - 1]"),
    ("optim.lr=1e300", "optim.lr", "(0, 10]"),
    ("optim.weight_decay=5", "optim.weight_decay", "[0, 1]"),
    ("run.threads=1000000", "run.threads", "auto or in [1, 4096]"),
    ("run.num_workers=100000", "run.num_workers", "[0, 256]"),
    ("data.image_size=100000", "data.image_size", "[8, 1024]"),
    ("attack.eps=5", "attack.eps", "5 is more than 1, the whole [0, 1] pixel range, for a linf radius"),
    ("eval.eps=2", "eval.eps", "2 is more than 1"),
    ("attack.threat=l2 attack.eps=56", "attack.eps", "56 is more than 55.43, the diameter of [0, 1] images of 3072"),
    ("attack.threat=l2 eval.eps=200 data.image_size=64", "eval.eps", "200 is more than 110.9"),
]


@pytest.mark.parametrize("overrides, key, fragment", OUT_OF_RANGE, ids=[o[0] for o in OUT_OF_RANGE])
def test_numbers_out_of_range(overrides, key, fragment):
    with pytest.raises(UserError) as info:
        from_dict({}, overrides.split(), source="file.yaml")
    assert str(info.value).startswith(f"file.yaml: {key}: ") and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides", ["run.seed=4294967295", "optim.lr=10", "run.threads=4096", "run.threads=auto",
                                       "run.num_workers=256", "data.image_size=1024", "attack.eps=1", "attack.eps=0",
                                       "attack.threat=l2 attack.eps=55", "attack.threat=l2 eval.eps=110 "
                                       "data.image_size=64"])
def test_numbers_at_their_bounds(overrides):
    assert from_dict({}, overrides.split()).to_dict()


# YAML 1.2 core schema: (text of run.name or run.seed, what it reads as)
SCALARS = [
    ("run:\n  seed: 010\n", ("seed", 10)),  # decimal, never octal
    ("run:\n  seed: 0o10\n", ("seed", 8)),
    ("run:\n  seed: 0x10\n", ("seed", 16)),
    ("run:\n  seed: +7\n", ("seed", 7)),
    ("run:\n  name: no\n", ("name", "no")),  # yes/no/on/off/y/n stay strings
    ("run:\n  name: off\n", ("name", "off")),
    ("run:\n  name: 1_000\n", ("name", "1_000")),  # no 1.1 underscores
    ("run:\n  name: 2024-01-01\n", ("name", "2024-01-01")),  # no timestamps
    ("run:\n  name: 1:30\n", ("name", "1:30")),  # no sexagesimal
    ("run:\n  mixed_precision: no\n", ("mixed_precision", "no")),
    ("run:\n  compile: TRUE\n", ("compile", True)),
    ("run:\n  compile: False\n", ("compile", False)),
    ("run:\n  max_steps: ~\n", ("max_steps", None)),
    ("run:\n  max_steps: NULL\n", ("max_steps", None)),
]


@pytest.mark.parametrize("text, expected", SCALARS, ids=[s[0].split(": ")[-1].strip() for s in SCALARS])
def test_yaml_1_2_scalars(tmp_path, text, expected):
    key, value = expected
    assert getattr(load_recipe(write(tmp_path, text)).run, key) == value


def test_yaml_1_2_floats(tmp_path):
    recipe = load_recipe(write(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: .5E-3\n"))
    assert (recipe.optim.lr, recipe.optim.weight_decay) == (0.001, 0.0005)
    with pytest.raises(UserError, match="method.alpha"):  # 5.0 is a float, and out of [0, 1)
        load_recipe(write(tmp_path, "method:\n  alpha: 5.\n"))


@pytest.mark.parametrize("override, key, value", [
    ("run.mixed_precision=no", "mixed_precision", "no"),  # the README's override
    ("run.seed=010", "seed", 10),
    ("run.name=yes", "name", "yes"),
    ("run.name=a: b: c", "name", "a: b: c"),  # not YAML: the text as written
])
def test_overrides_use_the_same_scalars(tmp_path, override, key, value):
    assert getattr(load_recipe(write(tmp_path, SAMPLE), [override]).run, key) == value


@pytest.mark.parametrize("override, fragments", [
    ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("attack.eps=1/0", ["attack.eps", "'1/0'"]),
    ("model.kwargs={a: 1, a: 2}", ["override", "duplicate key 'a'"]),
    ("run.name=*x", ["override", "aliases"]),
    ("run.name=!!str x", ["override", "tags"]),
    ("run.channels_last=yes", ["run.channels_last", "'yes'"]),
    ("base=other.yaml", ["unknown key base"]),  # bases are named in files, relative to them
])
def test_bad_overrides(tmp_path, override, fragments):
    path = write(tmp_path, SAMPLE)
    with pytest.raises(UserError) as info:
        load_recipe(path, [override])
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["no", "yes", "1e3", "0o10", "010", "true", "null", "~", ".inf", "8/255", "1_0"])
def test_saved_recipe_keeps_strings(tmp_path, name):
    """Strings that YAML 1.1 or 1.2 would read as something else are quoted when saved."""
    recipe = from_dict({"run": {"name": name}})
    save_recipe(recipe, tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml").run.name == name
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["run"]["name"] == name  # and for 1.1 readers


# Inheritance
def test_base_chain_merges_deeply(tmp_path):
    write(tmp_path, SAMPLE, "root.yaml")
    (tmp_path / "family").mkdir()
    write(tmp_path / "family", "base: ../root.yaml\nschedule:\n  epochs: 30\n  milestones: [20]\n"
                               "model:\n  kwargs: {img_size: 32}\n", "middle.yaml")
    leaf = write(tmp_path / "family", "base: middle.yaml\nrun:\n  seed: 5\nattack:\n  eps: 4/255\n", "leaf.yaml")
    recipe = load_recipe(leaf)
    root = load_recipe(tmp_path / "root.yaml")
    assert recipe.run.seed == 5 and recipe.attack.eps == Fraction(4, 255)
    assert recipe.schedule.epochs == 30 and recipe.schedule.milestones == [20]  # lists replace
    assert recipe.model.kwargs == {"drop_path_rate": 0.1, "img_size": 32}  # mappings merge
    assert recipe.model.mean == root.model.mean and recipe.data == root.data  # the rest from the root
    assert recipe.run.name == "leaf"
    # Overrides win over every file of the chain.
    assert load_recipe(leaf, ["run.seed=7", "schedule.epochs=40"]).run.seed == 7


def test_saved_recipe_is_expanded(tmp_path):
    write(tmp_path, SAMPLE, "root.yaml")
    leaf = write(tmp_path, "base: root.yaml\nrun:\n  seed: 5\n", "leaf.yaml")
    recipe = load_recipe(leaf)
    save_recipe(recipe, tmp_path / "run_recipe.yaml")
    saved = yaml.safe_load((tmp_path / "run_recipe.yaml").read_text())
    assert "base" not in saved and saved == recipe.to_dict()
    assert saved["data"]["dataset"] == "some/where" and saved["run"]["seed"] == 5
    (tmp_path / "root.yaml").unlink()  # the saved recipe stands alone
    assert load_recipe(tmp_path / "run_recipe.yaml") == recipe


def test_base_cycle_names_both_files(tmp_path):
    a = write(tmp_path, "base: b.yaml\nrun: {seed: 1}\n", "a.yaml")
    b = write(tmp_path, "base: a.yaml\nrun: {seed: 2}\n", "b.yaml")
    with pytest.raises(UserError, match="leads back") as info:
        load_recipe(a)
    assert str(b) in str(info.value) and str(a) in str(info.value)


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path, "base: sub/parent.yaml\nrun: {seed: 1}\n", "child.yaml")
    with pytest.raises(UserError, match="not found") as info:
        load_recipe(child)
    assert str(info.value).startswith(str(child)) and str(tmp_path / "sub" / "parent.yaml") in str(info.value)


def test_error_in_a_base_names_the_base(tmp_path):
    write(tmp_path, "run:\n  seed: 1\n  seed: 2\n", "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nschedule: {epochs: 3, milestones: []}\n", "child.yaml")
    with pytest.raises(UserError, match="duplicate key 'seed'") as info:
        load_recipe(child)
    assert str(info.value).startswith(str(tmp_path / "parent.yaml"))
    write(tmp_path, "optim:\n  lr: -1\n", "parent.yaml")
    with pytest.raises(UserError, match="optim.lr") as info:  # a bad value from the base: both files named
        load_recipe(child)
    assert str(child) in str(info.value) and str(tmp_path / "parent.yaml") in str(info.value)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


TWINS = [p for p in RECIPES if "base" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", TWINS, ids=[p.name for p in TWINS])
def test_twins_state_exactly_what_differs(path):
    stated = _flat(yaml.safe_load(path.read_text()))
    base_path = path.parent / stated.pop("base")
    # run.name is each file's stem; the twin and its base are the same recipe otherwise, but for what it states.
    twin, base = (_flat(load_recipe(p, ["run.name=x"]).to_dict()) for p in (path, base_path))
    assert {key for key in twin if twin[key] != base[key]} == set(stated)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and not lines[1].startswith("#")  # one line says what the twin is


def test_recipe_families():
    """One full file per family; every other shipped recipe is a twin of a file in recipes/."""
    full = sorted(p.name for p in set(RECIPES) - set(TWINS))
    assert full == ["prn18_cifar10.yaml", "quickstart_cifar10.yaml", "resnet18_cifar10.yaml", "wrn34_cifar10.yaml"]


CLI_ERRORS = [
    ("duplicate keys", "model:\n  arch: a\nmodel:\n  arch: b\n", "duplicate key 'model'"),
    ("lr inf", "optim:\n  lr: .inf\n", "optim.lr"),
    ("not UTF-8", b"run:\n  name: \xff\n", "not UTF-8"),
]


@pytest.mark.parametrize("content, fragment", [e[1:] for e in CLI_ERRORS], ids=[e[0] for e in CLI_ERRORS])
def test_cli_refuses_bad_recipes(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit) as info:
        main(["train", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("sglr-zoo train: error: ") and str(path) in lines[0] and fragment in lines[0]


@pytest.mark.slow
def test_cli_refuses_billion_laughs(tmp_path):
    """The installed command: exit code 2, one line, no traceback, in seconds."""
    path = write(tmp_path, _billion_laughs(), "bad.yaml")
    result = subprocess.run([str(Path(sys.executable).parent / "sglr-zoo"), "train", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "anchors and aliases" in result.stderr
