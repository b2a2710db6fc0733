"""Hub export, model cards, push, RobustBench entries and the zoo.

Network tests run the unmodified huggingface_hub client in subprocesses against the fake Hubs of conftest.py:
olah (a real Hub mirror, serving git repositories offline) for loading, tests/hub_server.py for pushing.
Result numbers below are made up for tests.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import sglr_zoo
from sglr_zoo import cli
from sglr_zoo.cards import write_zoo_cards
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import evaluate
from sglr_zoo.export import export_folder, export_robustbench, robustbench_entry
from sglr_zoo.models import Normalized, create_model, load_pretrained, save_pretrained, weights_fingerprint
from sglr_zoo.recipe import Recipe, load_recipe, save_recipe
from sglr_zoo.results import AttackStep, EpsSweep, Provenance, Results, SanityCheck
from sglr_zoo.source import collect
from sglr_zoo.zoo import ZOO, list_models, lookup

REPO = Path(__file__).resolve().parents[1]
ARCH = "preactresnet_tiny_cifar"
TEST_RESULTS = Results(  # made-up test values, not measurements
    provenance=Provenance(model="test-run/best", dataset="cifar10", split="test", source="local-dir:test",
                          which="TEST VALUES: first 16 test images", command="sglr-zoo eval runs/test --n 16"),
    arch=ARCH, threat="linf", eps="8/255", n_examples=16, clean_accuracy=81.25,
    robust_accuracy={"pgd20": 47.5, "autoattack": 43.75}, worst_case_accuracy=43.75,
    attacks={"pgd20": {"steps": 20, "step_size": "2/255", "version": "sglr_zoo-test"},
             "autoattack": {"version": "standard", "package": "pyautoattack-test"}},
    sanity={"clean_vs_attack": SanityCheck(True, "robust <= clean"),
            "square_vs_white_box": SanityCheck(None, "not run: test")},
    seed=0, device="cpu", versions={"torch": "test", "timm": "test", "sglr_zoo": "test", "pyautoattack": "test"},
    wall_time_s=12.0, created="TEST")


def _inputs() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A fake run directory in the trainer's layout, with best/ and last/ exports of a tiny model. Its recipe and
    run record hold absolute local paths, as a real run's may, which nothing published may show."""
    run = tmp_path_factory.mktemp("runs") / "test_run"
    for seed, which in ((0, "best"), (1, "last")):
        torch.manual_seed(seed)
        save_pretrained(create_model(ARCH, 10), run / which, label_names=[f"class{i}" for i in range(10)])
    recipe = Recipe()
    recipe.model.arch, recipe.schedule.epochs, recipe.schedule.milestones = ARCH, 4, [2, 3]
    recipe.method.start_epoch, recipe.run.name, recipe.run.output_dir = 0.5, "test_run", str(run.parent)
    recipe.data.dataset, recipe.data.n_train = str(run.parent / "data" / "cifar10"), 100  # 100 asked, 64 given
    save_recipe(recipe, run / "recipe.yaml")
    (run / "run.json").write_text(json.dumps({
        "sglr_zoo_version": "0.1.0", "git_commit": "0" * 40, "seed": 0, "best_epoch": 3, "last_epoch": 4,
        "command": f"sglr-zoo train {run.parent}/test.yaml run.output_dir={run.parent}",
        "class_names": [f"class{i}" for i in range(10)], "num_examples_train": 64, "num_examples_val": 16,
        "machine": "Test CPU, 2 CPUs (no native bf16)", "train_seconds": 4000.0, "data_source": str(run.parent / "data" / "cifar10")}))
    TEST_RESULTS.save(run / "best" / "results.json")
    (run / "metrics.csv").write_text("epoch,loss,val_clean_acc,val_pgd10_acc\n1,2.0,50.0,30.0\n")
    (run / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n test")
    return run


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_inputs())


def test_export_folder_loads_like_the_source(run_dir, tmp_path):
    out = export_folder(run_dir, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md", "recipe.yaml",
                                               "results.json", "curves.png", "run.json", "metrics.csv"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ARCH and config["label_names"][0] == "class0"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.0] * 3 and config["pretrained_cfg"]["std"] == [1.0] * 3
    assert config["sglr_zoo_export"] == {"checkpoint": "best", "epoch": 3}
    expected = _outputs(load_pretrained(f"local-dir:{run_dir / 'best'}"))
    assert torch.equal(_outputs(timm.create_model(f"local-dir:{out}", pretrained=True)), expected)
    assert torch.equal(_outputs(sglr_zoo.load(str(out))), expected)
    assert not sglr_zoo.load(str(out)).training
    assert Results.load(out / "results.json") == TEST_RESULTS
    with pytest.raises(UserError, match="not an empty folder"):
        export_folder(run_dir, out)


def test_export_writes_the_hubs_eval_results(run_dir, tmp_path):
    """`.eval_results/cifar10.yaml`, read back with huggingface_hub's own parser: one entry per accuracy measured,
    the results' numbers, with the split, the images and the evaluator's version in the notes."""
    from huggingface_hub import parse_eval_result_entries

    out = export_folder(run_dir, tmp_path / "export")
    entries = parse_eval_result_entries(yaml.safe_load((out / ".eval_results" / "cifar10.yaml").read_text()))
    measured = {"clean": TEST_RESULTS.clean_accuracy, **{f"{attack}-linf-8-255": accuracy
                                                         for attack, accuracy in TEST_RESULTS.robust_accuracy.items()}}
    assert {entry.task_id: entry.value for entry in entries} == measured
    assert {entry.dataset_id for entry in entries} == {"uoft-cs/cifar10"}
    for entry in entries:
        assert f"{TEST_RESULTS.n_examples} images of the {TEST_RESULTS.provenance.split} split" in entry.notes
        assert f"sglr_zoo {TEST_RESULTS.versions['sglr_zoo']}" in entry.notes and entry.date == TEST_RESULTS.created


def test_a_card_shows_the_eps_sweep(run_dir, tmp_path):
    """Results with an eps sweep: the export draws it (eps_sweep.png) and the card shows its table and the plot."""
    sweep = EpsSweep("pgd20", ["0", "4/255", "8/255", "16/255"], [81.25, 60.0, 47.5, 12.5], 52.5)  # made-up values
    out = export_folder(run_dir, tmp_path / "export", results=dataclasses.replace(TEST_RESULTS, eps_sweep=sweep))
    card = (out / "README.md").read_text()
    assert (out / "eps_sweep.png").read_bytes().startswith(b"\x89PNG") and "![accuracy against eps](eps_sweep.png)" in card
    assert "| eps | 0 | 4/255 | 8/255 | 16/255 |" in card and "| accuracy (%) | 81.25 | 60.00 | 47.50 | 12.50 |" in card
    assert "PGD-20, Linf" in card and "expected robustness\") is 52.50%" in card
    assert "eps_sweep.png" not in (export_folder(run_dir, tmp_path / "plain") / "README.md").read_text()


@pytest.mark.parametrize("record, size, what", [("metrics.csv", 17 << 20, "metrics.csv"),
                                                ("run.json", 17 << 20, "run.json"),
                                                ("curves.png", 65 << 20, "curves.png")])
def test_oversized_run_records_are_refused(run_dir, tmp_path, record, size, what):
    """The run's records an export reads and copies (the card's table and plot) are capped: a sparse file of many
    GiB would otherwise be read into memory, and a metrics.csv without a newline read whole for its header."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    os.truncate(run / record, size)
    with pytest.raises(UserError, match=rf"{re.escape(str(run / record))}: {size:,} bytes, more than a {what} can "
                                        "be") as info:
        export_folder(run, tmp_path / "export")
    assert "\n" not in str(info.value)


def test_full_disk_while_exporting_is_one_line(run_dir, tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match=r"could not write .*export/model.safetensors: the disk is full"):
        export_folder(run_dir, tmp_path / "export")


def test_run_json_nested_too_deeply_is_one_line(run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (run / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"run.json: not valid JSON \(nested too deeply\)"):
        export_folder(run, tmp_path / "export")


def test_nothing_exported_holds_a_local_path(run_dir, tmp_path):
    out = export_folder(run_dir, tmp_path / "export", repo_id="testorg/tiny-sglr")
    for path in out.iterdir():
        if path.suffix in (".md", ".json", ".yaml", ".csv"):
            assert str(run_dir.parent) not in path.read_text(), path.name
    recipe = load_recipe(out / "recipe.yaml")
    runs = run_dir.parent.name
    assert (recipe.run.output_dir, recipe.data.dataset) == (runs, "cifar10")  # the folders' own names
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["command"] == f"sglr-zoo train test.yaml run.output_dir={runs}" and run_info["seed"] == 0


def test_card_metadata_and_numbers_come_from_the_results(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = export_folder(run_dir, tmp_path / "export", repo_id="testorg/tiny-sglr")
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "mit"
    assert {"adversarial-robustness", "sglr", "image-classification"} <= set(card.data.tags)
    assert card.data.datasets == ["uoft-cs/cifar10"] and "model-index" in text
    values = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert values == {("accuracy", None): 81.25, ("robust_accuracy", "pgd20"): 47.5,
                      ("robust_accuracy", "autoattack"): 43.75}
    for snippet in ("| Clean | - | 81.25 |", "| PGD-20 | Linf, eps = 8/255 | 47.50 |", "| AutoAttack |", "43.75",
                    "16 examples", TEST_RESULTS.provenance.command, "pyautoattack-test",
                    "**best** checkpoint, from epoch 3", "last epoch 4", "alpha: 0.9", "start_epoch: 0.5",
                    "epochs: 4", "2403.09101", "@InProceedings", 'sglr_zoo.load("hf-hub:testorg/tiny-sglr")',
                    'timm.create_model(locate("hf-hub:testorg/tiny-sglr"), pretrained=True)',
                    "model.pretrained=hf-hub:testorg/tiny-sglr", "CPU-scale", "one standard error",
                    "- square_vs_white_box: not run - not run: test",
                    "highest PGD-10 accuracy",  # the selection column metrics.csv names (val_pgd10_acc)
                    "- training examples: 64", "- val examples: 16",  # run.json's real counts ...
                    "on the first 64 training examples",
                    "- machine: Test CPU, 2 CPUs (no native bf16)", "- training time: 1 h 7 min (the epochs'"):  # ... not the 100 the recipe asked for
        assert snippet in text, snippet
    assert "Sanity checks failed" not in text  # a check that did not run has not failed
    assert 'timm.create_model("hf-hub:' not in text  # timm's own download skips the sha256 check


def test_card_without_results_says_not_evaluated(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = export_folder(run_dir, tmp_path / "export", which="last")  # last/ has no results.json
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "Not evaluated" in card.content and "**last** checkpoint, from epoch 4" in card.content
    assert "81.25" not in card.content and not (out / "results.json").exists()


def test_card_names_the_backbone_of_a_fine_tuned_model(run_dir, tmp_path):
    run = tmp_path / "finetuned"
    shutil.copytree(run_dir, run)
    recipe = load_recipe(run / "recipe.yaml", [f"finetune.backbone=local-dir:{tmp_path}/backbone",
                                               "finetune.mode=linear_probe", "finetune.backbone_sha256=" + "ab" * 32,
                                               "finetune.backbone_revision=0123abc"])
    save_recipe(recipe, run / "recipe.yaml")
    text = (export_folder(run, tmp_path / "export") / "README.md").read_text()
    assert ("It was fine-tuned (linear probe) from the backbone `local-dir:backbone` at revision `0123abc` "
            f"(model.safetensors sha256 `{'ab' * 32}`).") in text
    assert "fine-tuned" not in (export_folder(run_dir, tmp_path / "plain") / "README.md").read_text()


def test_card_flags_failed_sanity_checks(run_dir, tmp_path):
    failed = dataclasses.replace(TEST_RESULTS, sanity={"large_eps": SanityCheck(False, "pgd20 at 64/255: 40%")})
    text = (export_folder(run_dir, tmp_path / "export", results=failed) / "README.md").read_text()
    assert "**Sanity checks failed:** large_eps (pgd20 at 64/255: 40%)" in text
    assert "- large_eps: FAILED - pgd20 at 64/255: 40%" in text


def test_card_of_a_resumed_autoattack_states_its_time_in_all(run_dir, tmp_path):
    """An evaluation that resumed AutoAttack from its state file ran for less than its sub-attacks' seconds (kept in
    the state): the card gives both; a run in one go shows its wall time alone."""
    steps = {"apgd-ce": AttackStep(50.0, 400.0), "apgd-t": AttackStep(45.0, 2300.0)}  # made-up values
    resumed = dataclasses.replace(TEST_RESULTS, autoattack_per_attack=steps, attack_seconds={"autoattack": 2310.0},
                                  wall_time_s=2400.0)
    text = (export_folder(run_dir, tmp_path / "resumed", results=resumed) / "README.md").read_text()
    assert "wall time 2400 s (this command's: it resumed AutoAttack from its state file; AutoAttack's sub-attacks " \
           "took 2700 s in all), with:" in text
    in_one_go = dataclasses.replace(resumed, attack_seconds={"autoattack": 2710.0}, wall_time_s=2800.0)
    assert "wall time 2800 s, with:" in (export_folder(run_dir, tmp_path / "one", results=in_one_go) / "README.md"
                                         ).read_text()


def test_card_template_ships_with_the_package():
    """The card's text is a Jinja file inside the package, declared as package data so an install has it."""
    from sglr_zoo.cards import CARD_TEMPLATE

    assert CARD_TEMPLATE.is_file() and CARD_TEMPLATE.parent.parent == Path(sglr_zoo.__file__).parent
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = re.findall(r'"([^"]+)"', re.search(r"sglr_zoo = \[(.*?)\]", section)[1])
    assert any(CARD_TEMPLATE.relative_to(CARD_TEMPLATE.parent.parent).match(pattern) for pattern in patterns)


def test_results_must_match_the_weights(run_dir):
    with pytest.raises(UserError, match="results are for"):
        collect(run_dir, results=dataclasses.replace(TEST_RESULTS, arch="wrn34_10_cifar"))
    bad = run_dir.parent / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(UserError, match=f"{bad}.*schema"):
        collect(run_dir, results=bad)


def test_results_must_be_of_these_weights(run_dir, tmp_path):
    """The evaluator records the fingerprint of the weights it evaluated; an export refuses another model's results."""
    best = load_pretrained(f"local-dir:{run_dir / 'best'}")
    measured = evaluate(best, _inputs(), torch.arange(4), attacks=["clean"])
    assert measured.weights_sha256 == weights_fingerprint(load_file(run_dir / "best" / "model.safetensors"))
    assert collect(run_dir, results=measured).results == measured
    with pytest.raises(UserError, match="other weights than .*last"):
        collect(run_dir, which="last", results=measured)
    stock = Normalized(timm.create_model("resnet10t", num_classes=10), (0.5,) * 3, (0.25,) * 3)
    save_pretrained(stock, tmp_path / "stock")
    assert evaluate(load_pretrained(f"local-dir:{tmp_path / 'stock'}"), _inputs(), torch.arange(4),
                    attacks=["clean"]).weights_sha256 == weights_fingerprint(load_file(tmp_path / "stock" /
                                                                                       "model.safetensors"))


def test_a_run_without_best_exports_last(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "no_best")
    shutil.rmtree(run / "best")
    assert collect(run).which == "last" and collect(run).epoch == 4
    with pytest.raises(UserError, match="no best/ export; it has last/: pass --which last"):
        collect(run, which="best")


def test_robustbench_entry(run_dir, tmp_path, capsys):
    entry = robustbench_entry(run_dir)
    assert entry["clean_acc"] == "81.25" and entry["autoattack_acc"] == "43.75" and entry["reported"] == "43.75"
    assert entry["threat_model"] == "Linf" and entry["eps"] == "8/255" and entry["dataset"] == "cifar10"
    assert entry["additional_data"] is False and entry["number_forward_passes"] == 1
    assert entry["name"].startswith("Soften to Defend") and entry["venue"] == "CVPR 2024"
    assert "16 test examples" in entry["footnote"] and entry["link"].endswith("2403.09101")
    cli.main(["export-robustbench", str(run_dir), "--out", str(tmp_path / "rb.json")])
    assert json.loads((tmp_path / "rb.json").read_text()) == entry


def test_robustbench_needs_autoattack(run_dir, tmp_path, capsys):
    no_aa = dataclasses.replace(TEST_RESULTS, robust_accuracy={"pgd20": 47.5}).save(tmp_path / "results.json")
    with pytest.raises(UserError, match="no AutoAttack"):
        export_robustbench(run_dir, results=no_aa)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export-robustbench", str(run_dir), "--results", str(no_aa)])
    assert exit_info.value.code == 2 and "AutoAttack" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["wrn34-sglr", "prn18-trades"])  # every such entry: tests/test_zoo.py
def test_unpublished_zoo_name_names_its_recipe(name):
    with pytest.raises(UserError, match=f"not published.*sglr-zoo train {ZOO[name].recipe}"):
        sglr_zoo.load(name)


@pytest.mark.parametrize("name, suggestion", [("wrn34-sgrl", "wrn34-sglr"), ("prn18_sglr", "prn18-sglr")])
def test_unknown_name_suggests_close_names(name, suggestion):
    with pytest.raises(UserError, match=f"did you mean '{suggestion}'"):
        sglr_zoo.load(name)


def test_missing_export_and_bare_architecture_say_what_to_give(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "no_best")
    shutil.rmtree(run / "best")
    with pytest.raises(UserError, match=f"the run {run} has last/$"):
        sglr_zoo.load(str(run / "best"))
    with pytest.raises(UserError, match="'preactresnet18_cifar' is an architecture without weights: .*--weights"):
        sglr_zoo.load("preactresnet18_cifar")


def test_zoo_table_and_list(capsys):
    assert {e.name for e in ZOO.values()} >= {"wrn34-sglr", "prn18-sglr", "resnet18-sglr", "wrn34-pgdat",
                                              "wrn34-trades", "prn18-pgdat", "prn18-trades", "resnet18-pgdat",
                                              "resnet18-trades", "prn10q-c10-sglr-cpu"}
    committed = {}
    for entry in ZOO.values():
        assert timm.is_model(entry.arch) and entry.repo_id.startswith(f"sglr-zoo/{entry.arch}.")
        assert entry.recipe.endswith(".yaml") and (REPO / entry.recipe).is_file(), entry.recipe  # trains it
        results_file = entry.results_path  # numbers only from evaluator files: a bundle's, else model_cards/
        if results_file.is_file():
            committed[entry.name] = json.loads(results_file.read_text())
            assert entry.results.arch == entry.arch
        else:
            assert entry.results is None
    assert "prn10q-c10-sglr-cpu" in committed  # bundled: its results.json
    assert lookup("quickstart-sglr") is ZOO["prn10q-c10-sglr-cpu"]
    assert ZOO["wrn34-sglr"].repo_id == "sglr-zoo/wrn34_10_cifar.sglr_linf8_c10"
    rows = list_models()
    assert len(rows) == len(ZOO)
    assert all(r.weights == (ZOO[r.name].bundle is not None or ZOO[r.name].published) for r in rows)
    for row in rows:  # the table's numbers are the committed files' (raw JSON here), or absent
        data = committed.get(row.name)
        assert row.clean == (data["clean_accuracy"] if data else None)
        assert row.autoattack == (data["robust_accuracy"].get("autoattack") if data else None)
    cli.main(["list"])
    printed = capsys.readouterr().out
    assert "wrn34-sglr" in printed and "prn10q-c10-sglr-cpu" in printed and "wrn34_10_cifar" in printed
    assert "preactresnet_tiny_cifar" in printed.split("architectures")[1]


def test_write_zoo_cards(run_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "prn18_cifar10")  # the default run name of prn18-sglr's recipe
    shutil.copytree(run_dir, runs / "quickstart_cifar10")  # a bundled entry's: its card is in its bundle
    written = write_zoo_cards(runs, tmp_path / "cards")
    assert written == [tmp_path / "cards" / "prn18-sglr.md"]
    assert 'sglr_zoo.load("prn18-sglr")' in written[0].read_text()
    assert Results.load(tmp_path / "cards" / "prn18-sglr.results.json") == TEST_RESULTS


# ---- against the fake Hubs of conftest.py (client in subprocesses) ---------------------------------------------

@pytest.fixture(scope="module")
def mirrored(olah, run_dir, tmp_path_factory) -> dict[str, str]:
    """testorg/tiny (an export of run_dir's best/, weights in LFS) and testorg/pickle-only on the olah mirror."""
    staging = tmp_path_factory.mktemp("staging")
    tiny = export_folder(run_dir, staging / "tiny", repo_id="testorg/tiny")
    sha256 = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    olah.publish("testorg/tiny", tiny, lfs=("model.safetensors",))
    (staging / "pickle-only").mkdir()
    shutil.copyfile(tiny / "config.json", staging / "pickle-only" / "config.json")
    (staging / "pickle-only" / "pytorch_model.bin").write_bytes(b"not loaded")
    olah.publish("testorg/pickle-only", staging / "pickle-only")
    return {"url": olah.url, "sha256": sha256, "source": str(run_dir / "best")}


def test_load_from_hub_mirror(mirrored, hub_client):
    """sglr_zoo.load('hf-hub:...'), the models API and a published zoo alias, served by olah; every Hub id goes
    through the zoo's checked download (pickle-only repos refused, sha256 compared)."""
    out = hub_client(f"""
        import dataclasses, torch, timm, sglr_zoo
        from sglr_zoo import zoo
        from sglr_zoo.errors import UserError
        from sglr_zoo.models import create_model, load_pretrained
        from sglr_zoo.results import Results
        from huggingface_hub import constants

        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        run = lambda m: m.eval()(x)
        with torch.no_grad():
            expected = run(sglr_zoo.load({mirrored['source']!r}))
            assert torch.equal(run(sglr_zoo.load("hf-hub:testorg/tiny")), expected)
            assert torch.equal(run(sglr_zoo.load("hf-hub:testorg/tiny@main")), expected)
            assert torch.equal(run(load_pretrained("hf-hub:testorg/tiny")), expected)
            assert torch.equal(run(timm.create_model(zoo.locate("hf-hub:testorg/tiny"), pretrained=True)), expected)
            tuned = create_model("{ARCH}", 3, pretrained="hf-hub:testorg/tiny")  # a new head for fine-tuning
            assert run(tuned).shape == (4, 3)
            entry = dataclasses.replace(zoo.ZOO["prn18-sglr"], repo_id="testorg/tiny", published=True,
                                        sha256={mirrored['sha256']!r})  # published on the mirror only
            zoo.ZOO["prn18-sglr"] = entry
            assert torch.equal(run(sglr_zoo.load("prn18-sglr")), expected)
        measured = zoo.download("testorg/tiny") / "results.json"  # what finetune reads of a Hub backbone
        print("RESULTS:", sorted(Results.load(measured).robust_accuracy))

        def error(load, name):
            try:
                load(name)
            except UserError as e:
                return str(e)
            raise AssertionError(name + " loaded")

        zoo.ZOO["prn18-sglr"] = dataclasses.replace(entry, sha256="0" * 64)
        print("SHA:", error(sglr_zoo.load, "prn18-sglr"))
        print("PICKLE:", error(sglr_zoo.load, "hf-hub:testorg/pickle-only"))
        print("MODELS PICKLE:", error(load_pretrained, "hf-hub:testorg/pickle-only"))
        print("CREATE PICKLE:", error(lambda n: create_model("{ARCH}", 10, pretrained=n), "hf-hub:testorg/pickle-only"))
        print("MISSING:", error(sglr_zoo.load, "hf-hub:testorg/absent"))
        constants.HF_HUB_OFFLINE = True  # cached repos still load, with their results; others need the network
        assert torch.equal(run(sglr_zoo.load("hf-hub:testorg/tiny")), expected)
        assert zoo.download("testorg/tiny") / "results.json" == measured
        print("OFFLINE:", error(sglr_zoo.load, "hf-hub:testorg/pickle-only"))
        constants.HF_HUB_OFFLINE = False
        constants.ENDPOINT = "http://127.0.0.1:9"  # unreachable
        print("UNREACHABLE:", error(sglr_zoo.load, "hf-hub:testorg/never-cached"))
        print("OK")
        """, mirrored["url"])
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert out.rstrip().endswith("OK")
    assert "the zoo table expects " + "0" * 64 in lines["SHA"]
    for key in ("PICKLE", "MODELS PICKLE", "CREATE PICKLE"):
        assert "only pickle weights (pytorch_model.bin)" in lines[key], key
    assert "not found" in lines["MISSING"]
    assert lines["RESULTS"] == str(sorted(TEST_RESULTS.robust_accuracy))
    assert "offline" in lines["OFFLINE"] and "not in the local cache" in lines["OFFLINE"]
    assert "unreachable" in lines["UNREACHABLE"]


def test_push_then_load_back(hub, hub_client, run_dir):
    """`sglr-zoo push` (dry run, main, a branch, a pull request, private), then loading back what was pushed."""
    out = hub_client(f"""
        import torch, timm, sglr_zoo
        from sglr_zoo import cli
        run = {str(run_dir)!r}
        cli.main(["push", run, "--repo-id", "testorg/dry", "--dry-run"])
        cli.main(["push", run, "--repo-id", "testorg/pushed"])
        cli.main(["push", run, "--repo-id", "testorg/pushed", "--which", "last", "--revision", "dev"])
        cli.main(["push", run, "--repo-id", "testorg/pushed", "--which", "last", "--create-pr"])
        cli.main(["push", run, "--repo-id", "testorg/secret", "--private"])
        try:
            cli.main(["push", run, "--repo-id", "testorg/pushed", "--private"])  # exists, and is public
        except SystemExit as exit:
            print("EXIT:", exit.code)
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for which, hub_id in (("best", "hf-hub:testorg/pushed"), ("last", "hf-hub:testorg/pushed@dev")):
                expected = sglr_zoo.load(run + "/" + which)(x)
                assert torch.equal(sglr_zoo.load(hub_id)(x), expected), hub_id
                assert torch.equal(timm.create_model(hub_id, pretrained=True).eval()(x), expected), hub_id
        print("OK")
        """, hub.url, HF_TOKEN="hf_test_token")
    assert out.rstrip().endswith("OK") and "done: " in out and "/discussions/1" in out
    dry_run, rest = out.split("dry run: nothing uploaded")  # --dry-run lists the files and sends nothing
    size = (run_dir / "best" / "model.safetensors").stat().st_size
    assert f"{size:,d}  model.safetensors" in dry_run and "README.md" in dry_run and "results.json" in dry_run
    assert "dry run: testorg/dry would be a PUBLIC repo" in dry_run and "(public):" in dry_run
    assert "testorg/dry" not in hub.repos and not any("dry" in path for _, path in hub.requests)
    # The visibility is stated before the upload, and an existing public repo is not taken as --private.
    assert rest.index("uploading to testorg/pushed: a PUBLIC repo") < rest.index("files to testorg/pushed (public):")
    assert "uploading to testorg/secret: a private repo" in rest and hub.repos["testorg/secret"].private
    assert "EXIT: 2" in rest and not hub.repos["testorg/pushed"].private
    repo = hub.repos["testorg/pushed"]
    main = repo.commits[repo.refs["main"]]
    assert {"README.md", "model.safetensors", "config.json", "recipe.yaml", "results.json", "curves.png"} <= set(main)
    assert yaml.safe_load(main[".eval_results/cifar10.yaml"])[0]["dataset"] == {"id": "uoft-cs/cifar10", "task_id": "clean"}
    assert b"model-index" in main["README.md"] and main["model.safetensors"] == (
        run_dir / "best" / "model.safetensors").read_bytes()
    assert repo.commits[repo.refs["dev"]]["model.safetensors"] == (run_dir / "last" / "model.safetensors").read_bytes()
    assert "refs/pr/1" in repo.refs
    assert not any(str(run_dir.parent).encode() in content for content in main.values())


def test_hub_names_keep_working_from_their_new_modules():
    """sglr_zoo.hub was split (source, cards, export, push, bundle); every name it held still imports from it,
    with a DeprecationWarning naming its new home."""
    import importlib

    from sglr_zoo import hub

    with pytest.warns(DeprecationWarning, match="sglr_zoo.hub.export_folder is deprecated: import it from "
                                                "sglr_zoo.export"):
        from sglr_zoo.hub import export_folder as moved
    assert moved is export_folder
    homes = {"ModelSource": "source", "render_card": "cards", "robustbench_entry": "export", "Upload": "push",
             "push_zoo": "bundle", "MAX_BUNDLE_MB": "bundle", "PAPER_EPOCHS": "cards"}
    assert set(homes) <= set(hub.__all__)
    for name in hub.__all__:
        with pytest.warns(DeprecationWarning, match=f"sglr_zoo.hub.{name} is deprecated: import it from sglr_zoo"):
            getattr(hub, name)
    for name, home in homes.items():
        with pytest.warns(DeprecationWarning, match=f"import it from sglr_zoo.{home}$"):
            assert getattr(hub, name) is getattr(importlib.import_module(f"sglr_zoo.{home}"), name)
    with pytest.raises(AttributeError):
        hub.no_such_name  # noqa: B018


@pytest.mark.parametrize("name, label", [("pgd20", "PGD-20"), ("pgd10", "PGD-10"), ("cw20", "CW-20"),
                                         ("autoattack", "AutoAttack"), ("clean", "clean"), ("square", "square")])
def test_cards_name_attacks_through_the_one_grammar(name, label):
    """A card's attack labels come from sglr_zoo.attack_names (every pgd<steps>, not only pgd20)."""
    from sglr_zoo.cards import attack_label

    assert attack_label(name) == label


def test_card_of_a_budgeted_run_counts_the_planned_epochs(run_dir, tmp_path):
    """A budgeted run's recipe keeps its nominal schedule (200 epochs); the card reads the epochs and SGLR's start
    from the last plan in run.json."""
    run = tmp_path / "budgeted"
    shutil.copytree(run_dir, run)
    save_recipe(load_recipe(run / "recipe.yaml", ["schedule.epochs=200", "schedule.name=onecycle",
                                                  "schedule.budget=9m"]), run / "recipe.yaml")
    info = json.loads((run / "run.json").read_text())
    info["plans"] = [{"made_at": 0, "epochs": 9, "steps": 3500, "start_epoch": 5},
                     {"made_at": 350, "epochs": 11, "steps": 4100, "start_epoch": 7}]
    (run / "run.json").write_text(json.dumps(info))
    text = (export_folder(run, tmp_path / "export") / "README.md").read_text()
    assert "CPU-scale training: 11 epochs (the paper uses 200)" in text and "200 epochs" not in text
    assert "refined labels from epoch 7 on" in text
