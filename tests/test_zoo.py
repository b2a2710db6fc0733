"""The zoo's bundled entries: `sglr-zoo export --zoo-entry`, offline loading with the sha256 check, `sglr-zoo list`,
`sglr-zoo push --zoo` and the Hub copy loading prefers; then the real bundled entries of the table.

A tiny model trained for a few steps on tiny data, with results written by the evaluator, stands in for a real
entry (the bundle folder and the table are monkeypatched). The last tests run over the entries the table bundles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import sglr_zoo
from sglr_zoo import bundle, cards, cli, source, zoo
from sglr_zoo.data import load_splits, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import evaluate_model
from sglr_zoo.export import export_folder
from sglr_zoo.models import create_model, load_pretrained, save_pretrained
from sglr_zoo.outcomes import Outcomes, paired_test
from sglr_zoo.recipe import DataConfig, load_recipe, save_recipe
from sglr_zoo.results import Provenance, Results
from sglr_zoo.zoo import CHECK_RESULTS, METHOD_TAGS, ZOO, ZooEntry, _entry
from tests.conftest import write_parquet_dataset

REPO = Path(__file__).resolve().parents[1]
ARCH = "preactresnet_tiny_cifar"
NAME = "prnt-c10-sglr-cpu"
ENTRY = _entry(NAME, ARCH, "sglr", "recipes/quickstart_cifar10.yaml", scale="cpu", bundle=NAME, aliases=("tiny",))
# The table's real bundled entries, read before any test patches the table.
REAL_BUNDLED = [name for name, entry in ZOO.items() if entry.bundle is not None]
PAPER_SCALE = ["wrn34-sglr", "wrn34-pgdat", "wrn34-trades", "prn18-sglr", "prn18-pgdat", "prn18-trades",
               "resnet18-sglr", "resnet18-pgdat", "resnet18-trades"]


pytestmark = pytest.mark.usefixtures("one_thread")


class EvaluatedRun(NamedTuple):
    run: Path  # run directory with best/ (weights, results.json)
    check: Path  # the evaluator's clean + PGD-20 on the first 16 test images
    data: Path  # tiny parquet CIFAR-10 layout


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> EvaluatedRun:
    """A tiny model trained for a few steps, in a run directory, evaluated by the evaluator on tiny data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread` does for each test (this fixture is set up before it)
    try:
        root = tmp_path_factory.mktemp("zoo")
        data = write_parquet_dataset(root / "cifar10", n_train=32, n_test=16)  # named as the dataset it stands for
        splits = load_splits(DataConfig(dataset=str(data)))
        torch.manual_seed(0)
        model = create_model(ARCH, 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        images = to_float(splits.train.images, 32)
        for _ in range(10):
            loss = torch.nn.functional.cross_entropy(model(images), splits.train.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        run = root / "runs" / "tiny"
        save_pretrained(model, run / "best")
        resolved = ["schedule.budget=null", "schedule.epochs=3"]  # as a run records the budget it resolved
        save_recipe(load_recipe(REPO / ENTRY.recipe, [f"model.arch={ARCH}", f"data.dataset={data}", *resolved]),
                    run / "recipe.yaml")
        (run / "run.json").write_text(json.dumps({"seed": 0, "best_epoch": 1, "last_epoch": 3,
                                                  "num_examples_train": 32}))
        (run / "metrics.csv").write_text("epoch,val_pgd10_acc\n1,10.0\n")
        (run / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n test")
        evaluate_model(str(run / "best"), dataset=str(data), n=16, attacks=["clean", "pgd5", "autoattack"],
                       autoattack_version="custom", autoattack_attacks=["apgd-ce"], device="cpu", command="test",
                       outcomes_path=Outcomes.beside(run / "best" / "results.json")).save(run / "best" / "results.json")
        check = evaluate_model(str(run / "best"), dataset=str(data), n=16, attacks=["clean", "pgd20"], device="cpu",
                               command="test").save(run / "check.json")
        return EvaluatedRun(run, check, data)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def table(tmp_path, monkeypatch) -> dict[str, ZooEntry]:
    """The zoo table holding only ENTRY (no sha256 yet), its bundles under tmp_path/bundled."""
    monkeypatch.setattr(zoo, "BUNDLED", tmp_path / "bundled")
    for name in list(ZOO):
        monkeypatch.delitem(ZOO, name)
    monkeypatch.setitem(ZOO, NAME, ENTRY)
    return ZOO


@pytest.fixture()
def bundled(evaluated, table, monkeypatch) -> bundle.Bundle:
    """ENTRY bundled from the evaluated run, its sha256s in the table."""
    made = bundle.bundle(evaluated.run, NAME, check_results=evaluated.check)
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, sha256=made.sha256, config_sha256=made.config_sha256))
    return made


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def _card_numbers(readme: Path) -> dict[str | None, float]:
    from huggingface_hub import ModelCard

    return {result.metric_config: result.metric_value for result in ModelCard.load(readme).data.eval_results}


def _results_numbers(results: Results) -> dict[str | None, float]:
    return {None: results.clean_accuracy, **results.robust_accuracy}


def test_export_zoo_entry_writes_a_self_contained_bundle(evaluated, table, capsys):
    cli.main(["export", str(evaluated.run), "--zoo-entry", NAME, "--check-results", str(evaluated.check)])
    out = capsys.readouterr().out
    folder = zoo.BUNDLED / NAME
    sha256 = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert f"entry {NAME}: bundle={NAME!r}, sha256={sha256!r}" in out
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md", "recipe.yaml",
                                                  "results.json", "results.outcomes.json", CHECK_RESULTS,
                                                  "metrics.csv", "curves.png", "run.json", ".eval_results"}
    results = Results.load(evaluated.run / "best" / "results.json")
    assert Results.load(folder / "results.json") == results
    assert Outcomes.load(folder / "results.outcomes.json") == Outcomes.load(Outcomes.beside(evaluated.run / "best" /
                                                                                            "results.json"))
    assert Results.load(folder / CHECK_RESULTS) == Results.load(evaluated.check)
    assert _card_numbers(folder / "README.md") == _results_numbers(results)  # every card number is the results'
    card = (folder / "README.md").read_text()
    assert f'sglr_zoo.load("{NAME}")' in card and f"hf-hub:{ENTRY.repo_id}" in card and "float16" not in card
    # The folder needs nothing else: its card renders the same from the folder alone, and names no local path.
    assert str(cards.render_card(source.collect(folder), repo_id=ENTRY.repo_id, name=NAME)) == card
    for path in folder.iterdir():
        if path.suffix in (".md", ".json", ".yaml", ".csv"):
            assert str(evaluated.run.parent) not in path.read_text(), path.name


def test_twins_cards_compare_them_on_the_same_images(evaluated, table, tmp_path, monkeypatch, capsys):
    """Entries named each other's twin: a card shows, per attack, both accuracies and the paired counts of the two
    evaluations' outcomes on the same images; without the twin's outcomes it says why there is no comparison."""
    twin, twin_run = "prnt-c10-sglr-cpu-twin", tmp_path / "twin_run"
    shutil.copytree(evaluated.run, twin_run)
    model = load_pretrained(f"local-dir:{twin_run / 'best'}")
    torch.manual_seed(1)
    with torch.no_grad():  # other weights: some images change sides
        for parameter in model.parameters():
            parameter.add_(0.5 * parameter.std().nan_to_num() * torch.randn_like(parameter))
    save_pretrained(model, twin_run / "best")
    results = twin_run / "best" / "results.json"
    evaluate_model(str(twin_run / "best"), dataset=str(evaluated.data), n=16, attacks=["clean", "pgd5", "autoattack"],
                   autoattack_version="custom", autoattack_attacks=["apgd-ce"], device="cpu", command="test",
                   outcomes_path=Outcomes.beside(results)).save(results)
    check = evaluate_model(str(twin_run / "best"), dataset=str(evaluated.data), n=16, attacks=["clean", "pgd20"],
                           device="cpu", command="test").save(tmp_path / "twin_check.json")
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, twin=twin))
    monkeypatch.setitem(ZOO, twin, dataclasses.replace(ENTRY, name=twin, bundle=twin, aliases=(), twin=NAME))
    cli.main(["export", str(twin_run), "--zoo-entry", twin, "--check-results", str(check)])
    assert (f"training steps, trained with SGLR (Self-Guided Label Refinement) on PGD adversarial training. No paired "
            f"comparison yet: `{NAME}` has no per-example outcomes committed yet") in (
        zoo.BUNDLED / twin / "README.md").read_text()  # NAME is not bundled yet
    cli.main(["export", str(evaluated.run), "--zoo-entry", NAME, "--check-results", str(evaluated.check)])
    card = (zoo.BUNDLED / NAME / "README.md").read_text()
    mine = Outcomes.load(zoo.BUNDLED / NAME / "results.outcomes.json")
    theirs = Outcomes.load(zoo.BUNDLED / twin / "results.outcomes.json")
    assert f"`{twin}` is this model's twin" in card and "SGLR (Self-Guided Label Refinement)" in card
    for attack, label in (("clean", "Clean"), ("pgd5", "PGD-5"), ("autoattack", "AutoAttack")):
        test = paired_test(mine, theirs, attack)
        assert (f"| {label} | {test.accuracy_a:.2f} | {test.accuracy_b:.2f} | {test.only_a} | {test.only_b} | "
                f"{test.p_value:.2g} |") in card
    assert paired_test(mine, theirs, "clean").only_a + paired_test(mine, theirs, "clean").only_b > 0
    cli.main(["export", "--zoo-entry", twin])  # the twin's card again, now that NAME is bundled
    twin_card = (zoo.BUNDLED / twin / "README.md").read_text()
    test = paired_test(theirs, mine, "autoattack")
    assert f"`{NAME}` is this model's twin" in twin_card and f"| {test.only_a} | {test.only_b} |" in twin_card
    (zoo.BUNDLED / twin / "results.outcomes.json").unlink()
    card = str(cards.render_card(source.collect(zoo.BUNDLED / NAME), name=NAME))
    assert f"No paired comparison yet: `{twin}` has no per-example" in card and "McNemar p |" not in card
    evaluate_model(str(twin_run / "best"), dataset=str(evaluated.data), n=8, attacks=["clean"], device="cpu",
                   command="test", outcomes_path=zoo.BUNDLED / twin / "results.outcomes.json")  # other images
    card = str(cards.render_card(source.collect(zoo.BUNDLED / NAME), name=NAME))
    assert "No paired comparison yet: the two evaluations are not of the same images" in card
    assert "McNemar p |" not in card
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--zoo-entry", "no-such-entry"])
    assert exit_info.value.code == 2 and "not a bundled zoo entry" in capsys.readouterr().err


def test_outcomes_that_are_not_of_the_results_beside_them_are_refused(evaluated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated.run, run)
    path = Outcomes.beside(run / "best" / "results.json")
    kept = Outcomes.load(path)
    for change in ({"autoattack": None}, {"pgd5": [not flag for flag in kept.correct["pgd5"]]}):
        other = dataclasses.replace(kept, correct={**kept.correct, **change})
        other.correct = {attack: flags for attack, flags in other.correct.items() if flags is not None}
        other.save(path)
        with pytest.raises(UserError, match=r"results.outcomes.json: not the per-example outcomes of the results"):
            source.collect(run)


def test_bundled_entry_loads_offline(bundled, evaluated, tmp_path, monkeypatch):
    """By name and alias, with no network: a published entry whose Hub copy cannot be fetched (offline mode, empty
    cache) falls back to the bundle without a warning."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    expected = _outputs(load_pretrained(f"local-dir:{evaluated.run / 'best'}"))
    assert zoo.locate(NAME) == f"local-dir:{bundled.folder}"
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ZOO[NAME], published=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in (NAME, "tiny"):
            model = sglr_zoo.load(name)
            assert torch.equal(_outputs(model), expected) and not model.training


def test_eval_by_zoo_name(bundled, evaluated, tmp_path, capsys):
    """`sglr-zoo eval NAME` on the first examples reproduces the bundle's check results (same weights, same data)."""
    cli.main(["eval", NAME, "--dataset", str(evaluated.data), "--n", "16", "--attacks", "clean,pgd20",
              "--device", "cpu", "--out", str(tmp_path / "results.json")])
    measured, check = Results.load(tmp_path / "results.json"), Results.load(bundled.folder / CHECK_RESULTS)
    assert measured.provenance.model == NAME and measured.n_examples == check.n_examples
    assert _results_numbers(measured) == _results_numbers(check)


def test_changed_bundle_fails_loudly(bundled, monkeypatch):
    weights = bundled.folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{NAME}: .*model.safetensors has sha256 [0-9a-f]{{64}}, the zoo table "
                                        f"expects {bundled.sha256}: the bundled weights file differs from the zoo's "
                                        "record"):
        sglr_zoo.load(NAME)
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, sha256=None))
    with pytest.raises(UserError, match="gives no sha256.*sglr-zoo export RUN --zoo-entry"):
        sglr_zoo.load(NAME)
    weights.unlink()
    with pytest.raises(UserError, match="lacks config.json or model.safetensors"):
        sglr_zoo.load(NAME)


CONFIG_EDITS = {  # an edit of a bundled config.json that loads without error on its own
    "shifted normalisation": lambda config: config["model_args"].update(mean=[0.6, 0.6, 0.6], std=[0.2, 0.2, 0.2]),
    "other labels": lambda config: config.update(label_names=list("abcdefghij")),
    "one space": None,
}


@pytest.mark.parametrize("edit", CONFIG_EDITS)
def test_edited_bundle_config_fails_loudly(edit, bundled, monkeypatch):
    """The table pins config.json too: it says how the weights are built and what normalises the inputs, so an
    edited one would load a model that scores near chance from intact weights."""
    path = bundled.folder / "config.json"
    if CONFIG_EDITS[edit] is None:
        path.write_text(path.read_text() + " ")
    else:
        config = json.loads(path.read_text())
        CONFIG_EDITS[edit](config)
        path.write_text(json.dumps(config, indent=2) + "\n")
    load_pretrained(f"local-dir:{bundled.folder}")  # a valid config.json by itself: only the zoo's record tells
    with pytest.raises(UserError, match=f"{NAME}: .*config.json has sha256 [0-9a-f]{{64}}, the zoo table expects "
                                        f"{bundled.config_sha256}: the bundled config file differs from the zoo's "
                                        "record") as info:
        sglr_zoo.load(NAME)
    assert "\n" not in str(info.value)
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ZOO[NAME], config_sha256=None))
    with pytest.raises(UserError, match="gives no config_sha256 for .*config.json.*sglr-zoo export RUN --zoo-entry"):
        sglr_zoo.load(NAME)


def test_bundle_and_push_give_both_sha256s_for_the_table(bundled):
    """What `export --zoo-entry` and `push` return carries the two sha256s a table entry pins."""
    config = hashlib.sha256((bundled.folder / "config.json").read_bytes()).hexdigest()
    assert bundled.config_sha256 == config
    ((name, _, upload),) = bundle.push_zoo("testorg", dry_run=True, announce=lambda line: None)
    assert (name, upload.sha256, upload.config_sha256) == (NAME, bundled.sha256, config)


@pytest.mark.parametrize("name", ["hf-hub:../../etc", "hf-hub:../etc", "hf-hub:org/../../etc", "hf-hub:a/b/c",
                                  "hf-hub:org/na me", "hf-hub:", "hf-hub:org/name@../../etc", "hf-hub:org/name@/abs",
                                  "hf-hub:org/name@a//b"])
def test_malformed_hub_ids_are_one_line(name, tmp_path, monkeypatch, capsys):
    """Checked before any request or path in the cache is made from them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=re.escape(name) + ": .* is not a (Hub repo id|branch, tag or commit name)"):
        sglr_zoo.load(name)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", name, "--n", "1", "--dataset", str(tmp_path / "no_data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_fp16_bundle(evaluated, table, tmp_path, monkeypatch):
    """A float16 bundle holds the numbers of its float16 weights: results measured on the float32 ones are refused,
    and the float16 export, evaluated, bundles."""
    from safetensors import safe_open

    with pytest.raises(UserError, match=r"the results were measured on other weights than the float16 ones.*"
                                        r"sglr-zoo export .* --fp16 --out FOLDER"):
        bundle.bundle(evaluated.run, NAME, check_results=evaluated.check, half=True)
    half = export_folder(evaluated.run, tmp_path / "half", half=True)
    for attacks, out in ((["clean", "pgd5", "autoattack"], half / "results.json"),
                         (["clean", "pgd20"], tmp_path / "check.json")):
        evaluate_model(str(half), dataset=str(evaluated.data), n=16, attacks=attacks, autoattack_version="custom",
                       autoattack_attacks=["apgd-ce"], device="cpu", command="test",
                       outcomes_path=Outcomes.beside(out)).save(out)  # as `sglr-zoo eval --out` writes both
    made = bundle.bundle(half, NAME, check_results=tmp_path / "check.json", half=True)
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, sha256=made.sha256, config_sha256=made.config_sha256))
    source = evaluated.run / "best" / "model.safetensors"
    with safe_open(str(made.folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    assert (made.folder / "model.safetensors").stat().st_size < 0.6 * source.stat().st_size
    model = sglr_zoo.load(NAME)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # computes in float32
    expected = _outputs(load_pretrained(f"local-dir:{source.parent}"))
    assert torch.allclose(_outputs(model), expected, atol=1e-2) and not torch.equal(_outputs(model), expected)
    assert "stored in float16" in (made.folder / "README.md").read_text()


def _without_results(evaluated: EvaluatedRun, tmp_path: Path) -> dict:
    run = Path(shutil.copytree(evaluated.run, tmp_path / "no_results"))
    (run / "best" / "results.json").unlink()
    return {"run_or_folder": run}


def _results(evaluated: EvaluatedRun, tmp_path: Path, **changes) -> Path:
    results = Results.load(evaluated.run / "best" / "results.json")
    return dataclasses.replace(results, **changes).save(tmp_path / "changed.json")


def _check(evaluated: EvaluatedRun, tmp_path: Path, **changes) -> Path:
    return dataclasses.replace(Results.load(evaluated.check), **changes).save(tmp_path / "check_changed.json")


REFUSALS = {  # case: (changes to bundle()'s arguments, expected message)
    "not in the table": (lambda e, t: {"name": "absent"}, "'absent' is not in the zoo table: add it"),
    "no results": (_without_results, "has no results.json from the evaluator: run `sglr-zoo eval"),
    "no autoattack": (lambda e, t: {"results": _results(e, t, robust_accuracy={"pgd5": 6.25})},
                      "no AutoAttack accuracy"),
    "no check results": (lambda e, t: {"check_results": None}, "--check-results FILE is needed.*--attacks clean,pgd20"),
    "check without pgd20": (lambda e, t: {"check_results": _check(e, t, robust_accuracy={"pgd10": 5.0})},
                            "no pgd20 accuracy"),
    "check on other images": (lambda e, t: {"check_results": _check(
        e, t, provenance=Provenance(split="test", which="the given images, in order"))}, "not the first n examples"),
    "check of another threat": (lambda e, t: {"check_results": _check(e, t, eps="4/255")},
                                "eps '4/255' differs from the results' '8/255'"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bundle_refuses(case, evaluated, table, tmp_path):
    change, message = REFUSALS[case]
    arguments = {"run_or_folder": evaluated.run, "name": NAME, "check_results": evaluated.check,
                 **change(evaluated, tmp_path)}
    with pytest.raises(UserError, match=message):
        bundle.bundle(**arguments)
    assert not (zoo.BUNDLED / NAME).exists()


def test_bundle_refuses_what_the_table_does_not_say(evaluated, table, monkeypatch, capsys):
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, arch="preactresnet18_cifar"))
    with pytest.raises(UserError, match="the zoo table says arch 'preactresnet18_cifar', but .* has "
                                        f"'{ARCH}'"):
        bundle.bundle(evaluated.run, NAME, check_results=evaluated.check)
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, method="pgd_at"))
    with pytest.raises(UserError, match="says method 'pgd_at', but .* has 'sglr'"):
        bundle.bundle(evaluated.run, NAME, check_results=evaluated.check)
    monkeypatch.setitem(ZOO, NAME, ENTRY)
    monkeypatch.setattr(bundle, "MAX_BUNDLE_MB", 0.01)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(evaluated.run), "--zoo-entry", NAME, "--check-results", str(evaluated.check)])
    assert exit_info.value.code == 2 and "MiB a bundled entry may commit; pass --fp16" in capsys.readouterr().err
    monkeypatch.setattr(bundle, "MAX_BUNDLE_MB", 5)
    bundle.bundle(evaluated.run, NAME, check_results=evaluated.check)
    with pytest.raises(UserError, match="not an empty folder"):  # re-bundling needs the old folder removed
        bundle.bundle(evaluated.run, NAME, check_results=evaluated.check)


def test_list_shows_the_bundled_numbers(bundled, capsys):
    results = Results.load(bundled.folder / "results.json")
    (row,) = sglr_zoo.list_models()
    assert (row.clean, row.autoattack, row.n_examples) == (results.clean_accuracy,
                                                           results.robust_accuracy["autoattack"], 16)
    assert row.bundled and not row.published and row.weights and row.aliases == ("tiny",)
    cli.main(["list"])
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith(NAME))
    assert line.split()[5:] == [f"{results.clean_accuracy:.2f}", f"{results.robust_accuracy['autoattack']:.2f}",
                                "16", "bundled"]
    assert f"tiny -> {NAME}" in printed


def test_push_zoo_then_load_prefers_the_hub_copy(bundled, evaluated, hub, hub_client, tmp_path):
    """`sglr-zoo push --zoo ORG` uploads the bundle; a published entry then loads the Hub copy when its sha256 is
    the table's, and the bundle (with a warning) when the Hub copy differs, or (silently) when offline."""
    other = tmp_path / "other"
    torch.manual_seed(1)
    save_pretrained(create_model(ARCH, 10), other)
    repo = f"testorg/{ENTRY.repo_id.split('/')[1]}"
    out = hub_client(f"""
        import dataclasses, warnings
        from pathlib import Path
        import torch
        from huggingface_hub import constants
        import sglr_zoo
        from sglr_zoo import cli, zoo
        from sglr_zoo.zoo import ZooEntry

        zoo.BUNDLED = Path({str(zoo.BUNDLED)!r})
        entry = {ZOO[NAME]!r}
        zoo.ZOO.clear()
        zoo.ZOO[entry.name] = entry
        cli.main(["push", "--zoo", "testorg", "--dry-run"])
        cli.main(["push", "--zoo", "testorg"])
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        bundled = sglr_zoo.load(entry.name)(x)
        zoo.ZOO[entry.name] = dataclasses.replace(entry, published=True, repo_id={repo!r})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            print("HUB COPY:", zoo.locate(entry.name))
            assert torch.equal(sglr_zoo.load(entry.name)(x), bundled)
        cli.main(["push", {str(other)!r}, "--repo-id", {repo!r}])  # the Hub copy now differs from the table
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print("CHANGED HUB:", zoo.locate(entry.name))
            assert torch.equal(sglr_zoo.load(entry.name)(x), bundled)
        print("WARNING:", caught[0].message)
        constants.HF_HUB_OFFLINE = True
        zoo.ZOO[entry.name] = dataclasses.replace(entry, published=True, repo_id="testorg/never-fetched")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            print("OFFLINE:", zoo.locate(entry.name))
        print("OK")
        """, hub.url, HF_TOKEN="hf_test_token", OMP_NUM_THREADS="1")
    assert out.rstrip().endswith("OK")
    dry_run, rest = out.split("dry run: nothing uploaded", 1)
    assert f"would upload {NAME} 11 files to {repo}" in dry_run and CHECK_RESULTS in dry_run and ".eval_results/cifar10.yaml" in dry_run
    assert f"model.safetensors sha256: {bundled.sha256}" in dry_run
    assert f"{NAME}: published=True, revision='" in rest and f"repo_id={repo!r}" in rest
    lines = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith(("HUB", "CHANGED", "WARN",
                                                                                      "OFFLINE")))
    assert lines["HUB COPY"] != f"local-dir:{bundled.folder}" and "hf_home" in lines["HUB COPY"]
    assert lines["CHANGED HUB"] == lines["OFFLINE"] == f"local-dir:{bundled.folder}"
    assert "not using the Hub copy" in lines["WARNING"] and "the zoo table expects" in lines["WARNING"]
    # What went up is the bundle: the same bytes, except the card, rendered again to name the repo it is in
    # (`other` went up later, in a commit without check_results.json).
    first = next(files for files in hub.repos[repo].commits.values() if CHECK_RESULTS in files)
    for path in bundled.folder.rglob("*"):
        name = path.relative_to(bundled.folder).as_posix()
        if path.is_file() and name != "README.md":
            assert first[name] == path.read_bytes(), name
    card = first["README.md"].decode()
    assert f'sglr_zoo.load("hf-hub:{repo}")' in card and b"model-index" in first["README.md"]
    assert re.sub(re.escape(repo), ENTRY.repo_id, card) == (bundled.folder / "README.md").read_text()


def test_push_zoo_needs_bundled_entries(table, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the table names a bundle that is not there
        cli.main(["push", "--zoo", "testorg", "--dry-run"])
    assert exit_info.value.code == 2 and "lacks config.json or model.safetensors" in capsys.readouterr().err
    monkeypatch.setitem(ZOO, NAME, dataclasses.replace(ENTRY, bundle=None))
    with pytest.raises(SystemExit):
        cli.main(["push", "--zoo", "testorg", "--dry-run"])
    assert "no zoo entry is bundled yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["push", "--zoo", "testorg", "runs/x"])
    assert "give no RUN_OR_FOLDER or --repo-id" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n, e in ZOO.items()
                                  if e.bundle is None and not e.published and e.superseded_by is None])
def test_entries_without_weights_name_their_recipe(name):
    with pytest.raises(UserError, match=f"not published yet.*sglr-zoo train {ZOO[name].recipe}"):
        sglr_zoo.load(name)


def test_the_bundle_keeps_one_entry_an_architecture_in_50_mb():
    """Issue 29's rule: an entry that a bundled one supersedes (same architecture, lower AutoAttack) leaves the
    bundle, and the bundled weights take at most 50 MB in all."""
    bundled = [entry for entry in ZOO.values() if entry.bundle is not None]
    assert len({entry.arch for entry in bundled}) == len(bundled)
    assert sum((entry.folder / "model.safetensors").stat().st_size for entry in bundled) <= 50e6


@pytest.mark.parametrize("name", [n for n, e in ZOO.items() if e.superseded_by is not None])
def test_a_superseded_entry_names_its_successor_and_where_its_weights_are(name):
    entry = ZOO[name]
    successor = ZOO[entry.superseded_by]
    assert entry.bundle is None and successor.bundle is not None and successor.arch == entry.arch
    assert successor.results.robust_accuracy["autoattack"] > entry.results.robust_accuracy["autoattack"]
    with pytest.raises(UserError, match=rf"superseded by {successor.name} .*git archive {entry.last_bundled} "
                                        rf"sglr_zoo/bundled/{name} \| tar -x.*sglr-zoo train {entry.recipe}"):
        sglr_zoo.load(name)
    stored = f"{entry.last_bundled}:sglr_zoo/bundled/{name}/model.safetensors"
    kept = subprocess.run(["git", "-C", str(REPO), "show", stored], capture_output=True)
    if kept.returncode != 0:
        pytest.skip(f"no git history here to check {entry.last_bundled} ({kept.stderr.decode().strip()[:80]})")
    assert hashlib.sha256(kept.stdout).hexdigest() == entry.sha256


def test_names_and_aliases_are_unique():
    names = [name for entry in ZOO.values() for name in (entry.name, *entry.aliases)]
    assert len(names) == len(set(names)) and all(name == entry.name for name, entry in ZOO.items())
    assert len({entry.repo_id for entry in ZOO.values()}) == len(ZOO)


def test_paper_scale_entries_keep_their_recipes():
    for name in PAPER_SCALE:
        entry = ZOO[name]
        assert entry.bundle is None and not entry.published, name  # not trained yet: the clear error above
        assert (REPO / entry.recipe).is_file() and entry.repo_id.startswith(f"{zoo.HUB_ORG}/{entry.arch}.")


def test_bundles_ship_as_package_data():
    """The bundled folders are package data: a wheel carries them as an editable install sees them."""
    assert zoo.BUNDLED.parent == Path(sglr_zoo.__file__).parent
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = re.findall(r'"([^"]+)"', re.search(r"sglr_zoo = \[(.*?)\]", section)[1])
    for file in ("model.safetensors", "config.json", "README.md", "results.json", CHECK_RESULTS, "curves.png"):
        assert any(Path("bundled", NAME, file).match(pattern) for pattern in patterns), file


# ---- the table's real bundled entries -------------------------------------------------------------------------

@pytest.mark.parametrize("name", REAL_BUNDLED)
def test_real_bundle_is_intact(name, tmp_path, monkeypatch):
    """Each bundled entry: weights match the table's sha256 and load offline; its results (AutoAttack included)
    are the card's numbers; its check results can be re-measured; its name says dataset and method."""
    from huggingface_hub import constants

    entry = ZOO[name]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    assert zoo.locate(name) == f"local-dir:{entry.folder}"
    assert hashlib.sha256((entry.folder / "model.safetensors").read_bytes()).hexdigest() == entry.sha256
    assert hashlib.sha256((entry.folder / "config.json").read_bytes()).hexdigest() == entry.config_sha256
    assert sglr_zoo.load(name).pretrained_cfg["architecture"] == entry.arch
    results = entry.results
    assert results is not None and results.arch == entry.arch and "autoattack" in results.robust_accuracy
    assert _card_numbers(entry.folder / "README.md") == _results_numbers(results)
    bundle.load_check_results(entry.folder / CHECK_RESULTS, results)
    source.collect(entry.folder)  # refuses results of other weights, and outcomes that are not the results'
    parts = name.split("-")
    assert METHOD_TAGS[entry.method] in parts and {"cifar10": "c10", "cifar100": "c100"}[entry.dataset] in parts
    recipe = load_recipe(entry.folder / "recipe.yaml")
    if recipe.schedule.epochs < cards.PAPER_EPOCHS or recipe.data.n_train is not None:  # a reduced scale, named
        scale = entry.repo_id.split(".", 1)[1].split("_")[3:]  # the tag's parts after method, threat, dataset
        assert scale and set(scale) <= set(parts), f"{name} / {entry.repo_id}: name the scale, e.g. -cpu"


@pytest.mark.real_data
@pytest.mark.parametrize("name", REAL_BUNDLED)
def test_real_bundle_reproduces_its_check_results(name, real_cifar10):
    """The bundled weights (float16 ones included) measured again on the same first test images: clean and PGD-20
    within 1.5 points of the check results committed with them."""
    check = Results.load(ZOO[name].folder / CHECK_RESULTS)
    measured = evaluate_model(name, dataset=str(real_cifar10), split=check.provenance.split, n=check.n_examples,
                              attacks=["clean", "pgd20"], threat=check.threat, eps=check.eps, seed=check.seed,
                              device="cpu")
    assert abs(measured.clean_accuracy - check.clean_accuracy) <= 1.5
    assert abs(measured.robust_accuracy["pgd20"] - check.robust_accuracy["pgd20"]) <= 1.5
