"""Property-based: any recipe text or override ends in a valid Recipe or in our one-line UserError naming the file."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglr_zoo.errors import UserError
from sglr_zoo.recipe import Recipe, from_dict, load_recipe, save_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# Values that are wrong somewhere: other types, non-finite numbers, YAML features recipes refuse, broken syntax.
BAD_VALUES = [".inf", "-.inf", ".nan", "1/0", "1e400", "'1e99999'", "-1", "0", "010", "0x1F", "0o7", "yes", "no",
              "~", "null", "''", "[]", "{}", "[1, 2", "{a: 1, a: 2}", "&a 1", "*a", "!!python/name:os.system",
              "!!binary aGk=", "2024-01-01", "8/255", "0.5", "true", "3", "x" * 300, "[" * 40, "\t", '"\\x00"',
              "9" * 5000, "{1: 2}", "{a: .nan}", "1e300", "4294967296", "1000000", "5"]  # the last: out of range
KEYS = ["data.n_train", "data.num_classes", "data.dataset", "model.arch", "model.mean", "model.kwargs",
        "model.kwargs.img_size", "attack.eps", "attack.threat", "attack.steps", "method.name", "method.start_epoch",
        "optim.lr", "optim.grad_clip", "optim.weight_decay", "schedule.epochs", "schedule.milestones",
        "eval.final_attacks", "eval.eps", "data.image_size", "run.mixed_precision", "run.seed", "run.threads",
        "run.num_workers", "run.name", "run", "base", "nope.x", "run.seed.x", ""]
TOKENS = ["data:", "model:", "run:", "attack:", "schedule:", "  ", "\n", "- ", ": ", "eps: ", "seed: ", "base: ",
          "wrn34_cifar10.yaml", "#", "'", '"', "{", "}", "[", "]", ",", "&x ", "*x", "!!", "? ", "---", "...", "|",
          ">", "%YAML 1.2", *BAD_VALUES]


@pytest.fixture(scope="module")
def folder():
    """A copy of recipes/ so that mutated twins still find their bases; the fuzzed file is written next to them."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(REPO / "recipes", Path(tmp) / "recipes")
        yield Path(tmp) / "recipes"


def check(path: Path, overrides: list[str] = ()) -> Recipe | None:
    """Loads `path`: a Recipe, or None after checking the UserError; any other exception fails the test."""
    try:
        recipe = load_recipe(path, overrides)
    except UserError as error:
        message = str(error)
        assert str(path) in message, message
        assert "\n" not in message and "Traceback" not in message, message
        return None
    saved = path.with_name("saved.yaml")  # a valid recipe survives its own save and load
    save_recipe(recipe, saved)
    assert load_recipe(saved).to_dict() == recipe.to_dict()
    return recipe


def mutate(lines: list[str], data: st.DataObject) -> list[str]:
    kind = data.draw(st.sampled_from(["delete", "duplicate", "value", "insert", "swap", "indent"]))
    if not lines:
        return lines
    i = data.draw(st.integers(0, len(lines) - 1))
    if kind == "delete":
        return lines[:i] + lines[i + 1:]
    if kind == "duplicate":
        return lines[:i + 1] + lines[i:]
    if kind == "value":  # replace what follows the key's colon
        head = lines[i].split(":", 1)[0]
        return lines[:i] + [f"{head}: {data.draw(st.sampled_from(BAD_VALUES))}"] + lines[i + 1:]
    if kind == "insert":
        line = data.draw(st.sampled_from(lines)).split(":", 1)[0] + ": " + data.draw(st.sampled_from(BAD_VALUES))
        return lines[:i] + [line] + lines[i:]
    if kind == "swap":
        j = data.draw(st.integers(0, len(lines) - 1))
        lines = list(lines)
        lines[i], lines[j] = lines[j], lines[i]
        return lines
    return lines[:i] + ["  " + lines[i]] + lines[i + 1:]


@pytest.mark.slow
@FUZZ
@given(data=st.data(), source=st.sampled_from(SHIPPED), n_mutations=st.integers(1, 4))
def test_mutated_shipped_recipes(folder, data, source, n_mutations):
    lines = source.read_text().splitlines()
    for _ in range(n_mutations):
        lines = mutate(lines, data)
    path = folder / "fuzz.yaml"
    path.write_text("\n".join(lines) + "\n")
    check(path)


@FUZZ
@given(source=st.sampled_from(SHIPPED), cut=st.floats(0, 1), junk=st.binary(max_size=40), at=st.floats(0, 1))
def test_truncated_and_corrupted_recipes(folder, source, cut, junk, at):
    raw = source.read_bytes()
    raw = raw[:int(cut * len(raw))]
    position = int(at * len(raw))
    path = folder / "fuzz.yaml"
    path.write_bytes(raw[:position] + junk + raw[position:])
    check(path)


@FUZZ
@given(parts=st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=40))
def test_random_yaml_like_text(folder, parts):
    path = folder / "fuzz.yaml"
    path.write_text("".join(parts), encoding="utf-8", errors="surrogatepass")
    check(path)


@pytest.mark.slow
@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(BAD_VALUES) | st.text(max_size=12)),
                          max_size=3),
       source=st.sampled_from(SHIPPED))
def test_random_overrides(folder, overrides, source):
    path = folder / "fuzz.yaml"
    path.write_bytes(source.read_bytes())
    check(path, [f"{key}={value}" for key, value in overrides])


def _keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.slow
def test_every_key_with_every_bad_value():
    """Exhaustive where the space is small: each section and field of a shipped recipe set to each bad value."""
    base = load_recipe(REPO / "recipes" / "wrn34_cifar10.yaml").to_dict()
    for key in _keys(base) + ["model.kwargs.img_size", "nope", "run.seed.x", ""]:
        for value in BAD_VALUES:
            override = f"{key}={value}"
            try:
                recipe = from_dict(base, [override], source="file.yaml")
            except UserError as error:
                assert str(error).startswith("file.yaml: ") and "\n" not in str(error), (override, str(error))
                continue
            assert from_dict(recipe.to_dict()) == recipe, override
