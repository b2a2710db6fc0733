"""Hub export, model cards, push, RobustBench entries and the zoo.

Network tests run the unmodified huggingface_hub client in subprocesses (HF_ENDPOINT must be set before it is
imported) against local servers: olah (a real Hub mirror, serving a git repository offline) for loading, and
tests/hub_server.py (a minimal Hub write protocol) for pushing. Result numbers below are made up for tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import timm
import torch

import sglr_zoo
from sglr_zoo import cli
from sglr_zoo.errors import UserError
from sglr_zoo.evaluate import load_results
from sglr_zoo.hub import collect, export_folder, export_robustbench, robustbench_entry, write_zoo_cards
from sglr_zoo.models import create_model, load_pretrained, save_pretrained
from sglr_zoo.recipe import Recipe, save_recipe
from sglr_zoo.zoo import ZOO, list_models
from tests.hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
ARCH = "preactresnet_tiny_cifar"
TEST_RESULTS = {  # made-up test values, not measurements
    "schema": "sglr_zoo.results/1", "model": "test-run/best", "arch": ARCH, "dataset": "cifar10", "split": "test",
    "source": "local-dir:test", "threat": "linf", "eps": "8/255", "n_examples": 16,
    "which": "TEST VALUES: first 16 test images", "clean_accuracy": 81.25,
    "robust_accuracy": {"pgd20": 47.5, "autoattack": 43.75},
    "attacks": {"pgd20": {"steps": 20, "step_size": "2/255", "version": "sglr_zoo-test"},
                "autoattack": {"version": "standard", "package": "pyautoattack-test"}},
    "sanity": {"clean_vs_attack": {"passed": True, "detail": "robust <= clean"}}, "seed": 0,
    "versions": {"torch": "test", "timm": "test", "sglr_zoo": "test", "pyautoattack": "test"},
    "wall_time_s": 12.0, "command": "sglr-zoo eval runs/test --n 16", "worst_case_accuracy": 43.75,
    "autoattack_per_attack": {}, "device": "cpu", "attack_seconds": {}, "created": "TEST",
}


def _inputs() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A fake run directory in the trainer's layout, with best/ and last/ exports of a tiny model."""
    run = tmp_path_factory.mktemp("runs") / "test_run"
    for seed, which in ((0, "best"), (1, "last")):
        torch.manual_seed(seed)
        save_pretrained(create_model(ARCH, 10), run / which, label_names=[f"class{i}" for i in range(10)])
    recipe = Recipe()
    recipe.model.arch, recipe.schedule.epochs, recipe.schedule.milestones = ARCH, 4, [2, 3]
    recipe.method.start_epoch, recipe.run.name = 0.5, "test_run"
    save_recipe(recipe, run / "recipe.yaml")
    (run / "run.json").write_text(json.dumps({
        "sglr_zoo_version": "0.1.0", "git_commit": "0" * 40, "command": "sglr-zoo train test.yaml", "seed": 0,
        "best_epoch": 3, "last_epoch": 4, "class_names": [f"class{i}" for i in range(10)], "num_examples_train": 64}))
    (run / "best" / "results.json").write_text(json.dumps(TEST_RESULTS))
    (run / "metrics.csv").write_text("epoch,loss\n1,2.0\n")
    (run / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n test")
    return run


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_inputs())


def test_export_folder_loads_like_the_source(run_dir, tmp_path):
    out = export_folder(run_dir, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md", "recipe.yaml",
                                               "results.json", "curves.png", "run.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ARCH and config["label_names"][0] == "class0"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.0] * 3 and config["pretrained_cfg"]["std"] == [1.0] * 3
    assert config["sglr_zoo_export"] == {"checkpoint": "best", "epoch": 3}
    expected = _outputs(load_pretrained(f"local-dir:{run_dir / 'best'}"))
    assert torch.equal(_outputs(timm.create_model(f"local-dir:{out}", pretrained=True)), expected)
    assert torch.equal(_outputs(sglr_zoo.load(str(out))), expected)
    assert not sglr_zoo.load(str(out)).training
    with pytest.raises(UserError, match="not an empty folder"):
        export_folder(run_dir, out)


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
                    "16 examples", TEST_RESULTS["command"], "pyautoattack-test", "**best** checkpoint, from epoch 3",
                    "last epoch 4", "alpha: 0.9", "start_epoch: 0.5", "epochs: 4", "2403.09101", "@InProceedings",
                    'sglr_zoo.load("hf-hub:testorg/tiny-sglr")', 'timm.create_model("hf-hub:testorg/tiny-sglr"',
                    "model.pretrained=hf-hub:testorg/tiny-sglr", "CPU-scale", "one standard error"):
        assert snippet in text, snippet


def test_card_without_results_says_not_evaluated(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = export_folder(run_dir, tmp_path / "export", which="last")  # last/ has no results.json
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "Not evaluated" in card.content and "**last** checkpoint, from epoch 4" in card.content
    assert "81.25" not in card.content and not (out / "results.json").exists()


def test_results_must_match_the_weights(run_dir):
    with pytest.raises(UserError, match="results are for"):
        collect(run_dir, results={**TEST_RESULTS, "arch": "wrn34_10_cifar"})
    bad = run_dir.parent / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(UserError, match="schema"):
        load_results(bad)


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
    no_aa = tmp_path / "results.json"
    no_aa.write_text(json.dumps({**TEST_RESULTS, "robust_accuracy": {"pgd20": 47.5}}))
    with pytest.raises(UserError, match="no AutoAttack"):
        export_robustbench(run_dir, results=no_aa)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export-robustbench", str(run_dir), "--results", str(no_aa)])
    assert exit_info.value.code == 2 and "AutoAttack" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["wrn34-sglr", "prn18-trades", "quickstart-sglr"])
def test_unpublished_zoo_name_names_its_recipe(name):
    with pytest.raises(UserError, match=f"not published.*sglr-zoo train {ZOO[name].recipe}"):
        sglr_zoo.load(name)


@pytest.mark.parametrize("name, suggestion", [("wrn34-sgrl", "wrn34-sglr"), ("prn18_sglr", "prn18-sglr")])
def test_unknown_name_suggests_close_names(name, suggestion):
    with pytest.raises(UserError, match=f"did you mean '{suggestion}'"):
        sglr_zoo.load(name)


def test_zoo_table_and_list(capsys):
    assert {e.name for e in ZOO.values()} >= {"wrn34-sglr", "prn18-sglr", "resnet18-sglr", "wrn34-pgdat",
                                              "wrn34-trades", "prn18-pgdat", "prn18-trades", "resnet18-pgdat",
                                              "resnet18-trades", "quickstart-sglr"}
    for entry in ZOO.values():
        assert timm.is_model(entry.arch) and entry.repo_id.startswith(f"sglr-zoo/{entry.arch}.")
        assert entry.recipe.startswith("recipes/") and entry.recipe.endswith(".yaml")
        assert not entry.published  # nothing uploaded yet
        results_file = REPO / "model_cards" / f"{entry.name}.results.json"  # numbers only from evaluator files
        assert entry.results == (json.loads(results_file.read_text()) if results_file.is_file() else None)
        assert entry.results is None or entry.results["arch"] == entry.arch
    assert ZOO["quickstart-sglr"].arch == "preactresnet10_slim_cifar"
    assert ZOO["wrn34-sglr"].repo_id == "sglr-zoo/wrn34_10_cifar.sglr_linf8_c10"
    rows = list_models()
    assert len(rows) == len(ZOO) and all(r.weights is False for r in rows)
    for row in rows:  # the table's numbers are the evaluator's, or absent
        results = ZOO[row.name].results
        assert row.clean == (results["clean_accuracy"] if results else None)
        assert row.autoattack == (results["robust_accuracy"].get("autoattack") if results else None)
    cli.main(["list"])
    printed = capsys.readouterr().out
    assert "wrn34-sglr" in printed and "quickstart-sglr" in printed and "wrn34_10_cifar" in printed
    assert "preactresnet_tiny_cifar" in printed.split("architectures")[1]


def test_write_zoo_cards(run_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "quickstart_cifar10")
    written = write_zoo_cards(runs, tmp_path / "cards")
    assert written == [tmp_path / "cards" / "quickstart-sglr.md"]
    assert 'sglr_zoo.load("quickstart-sglr")' in written[0].read_text()
    assert json.loads((tmp_path / "cards" / "quickstart-sglr.results.json").read_text()) == TEST_RESULTS


# ---- against local Hub servers (client in subprocesses) --------------------------------------------------------

def _client(script: str, endpoint: str, hf_home: Path, **env: str) -> str:
    """Runs `script` in a fresh Python with the Hub client pointed at `endpoint`; returns its stdout."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
                       HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO), **env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"client failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_repo(folder: Path, lfs: tuple[str, ...] = ()) -> None:
    """Commits `folder` as a git repo on branch main; files in `lfs` become LFS pointers (objects in .git/lfs)."""
    for name in lfs:
        data = (folder / name).read_bytes()
        oid = hashlib.sha256(data).hexdigest()
        obj = folder / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        obj.parent.mkdir(parents=True)
        obj.write_bytes(data)
        (folder / name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "upload"]):
        subprocess.run([*git, *args], cwd=folder, check=True, capture_output=True)


@pytest.fixture(scope="module")
def olah(run_dir, tmp_path_factory):
    """olah serving, offline, a mirror of testorg/tiny (an export, weights in LFS) and testorg/pickle-only."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to build olah's local mirror")
    root = tmp_path_factory.mktemp("olah")
    tiny = export_folder(run_dir, root / "mirrors" / "models" / "testorg" / "tiny", repo_id="testorg/tiny")
    sha256 = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    _git_repo(tiny, lfs=("model.safetensors",))
    pickle_only = root / "mirrors" / "models" / "testorg" / "pickle-only"
    pickle_only.mkdir()
    shutil.copyfile(tiny / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"not loaded")
    _git_repo(pickle_only)
    port = _free_port()
    config = root / "olah.toml"
    config.write_text(textwrap.dedent(f"""\
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{root / 'cache'}"
        mirrors-path = ["{root / 'mirrors'}"]
        hf-scheme = "http"
        hf-netloc = "127.0.0.1:9"
        hf-lfs-netloc = "127.0.0.1:9"
        mirror-scheme = "http"
        mirror-netloc = "127.0.0.1:{port}"
        mirror-lfs-netloc = "127.0.0.1:{port}"

        [accessibility]
        offline = true
        """))
    log = (root / "olah.log").open("w")
    command = [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(root / "logs")]
    server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/api/models/testorg/tiny/revision/main", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"olah exited: {(root / 'olah.log').read_text()[-2000:]}")
                time.sleep(0.1)
        else:
            pytest.fail(f"olah did not start: {(root / 'olah.log').read_text()[-2000:]}")
        yield {"url": url, "sha256": sha256, "source": str(run_dir / "best")}
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_load_from_hub_mirror(olah, tmp_path):
    """sglr_zoo.load('hf-hub:...'), timm's hf-hub: loader and a published zoo alias, served by olah."""
    out = _client(f"""
        import dataclasses, torch, timm, sglr_zoo
        from sglr_zoo import zoo
        from sglr_zoo.errors import UserError
        from huggingface_hub import constants

        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        run = lambda m: m.eval()(x)
        with torch.no_grad():
            expected = run(sglr_zoo.load({olah['source']!r}))
            assert torch.equal(run(sglr_zoo.load("hf-hub:testorg/tiny")), expected)
            assert torch.equal(run(sglr_zoo.load("hf-hub:testorg/tiny@main")), expected)
            assert torch.equal(run(timm.create_model("hf-hub:testorg/tiny", pretrained=True)), expected)
            entry = dataclasses.replace(zoo.ZOO["quickstart-sglr"], repo_id="testorg/tiny", published=True,
                                        sha256={olah['sha256']!r})  # the alias, published on the mirror
            zoo.ZOO["quickstart-sglr"] = entry
            assert torch.equal(run(sglr_zoo.load("quickstart-sglr")), expected)

        def error(name):
            try:
                sglr_zoo.load(name)
            except UserError as e:
                return str(e)
            raise AssertionError(name + " loaded")

        zoo.ZOO["quickstart-sglr"] = dataclasses.replace(entry, sha256="0" * 64)
        print("SHA:", error("quickstart-sglr"))
        print("PICKLE:", error("hf-hub:testorg/pickle-only"))
        print("MISSING:", error("hf-hub:testorg/absent"))
        constants.HF_HUB_OFFLINE = True  # cached repos still load; others say they need the network
        assert torch.equal(run(sglr_zoo.load("hf-hub:testorg/tiny")), expected)
        print("OFFLINE:", error("hf-hub:testorg/pickle-only"))
        constants.HF_HUB_OFFLINE = False
        constants.ENDPOINT = "http://127.0.0.1:9"  # unreachable
        print("UNREACHABLE:", error("hf-hub:testorg/never-cached"))
        print("OK")
        """, olah["url"], tmp_path / "hf_home")
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert out.rstrip().endswith("OK")
    assert "the zoo table expects " + "0" * 64 in lines["SHA"]
    assert "only pickle weights (pytorch_model.bin)" in lines["PICKLE"]
    assert "not found" in lines["MISSING"]
    assert "offline" in lines["OFFLINE"] and "not in the local cache" in lines["OFFLINE"]
    assert "unreachable" in lines["UNREACHABLE"]


@pytest.fixture()
def hub():
    with HubServer() as server:
        yield server


def test_push_then_load_back(hub, run_dir, tmp_path):
    """`sglr-zoo push` (dry run, main, a branch, a pull request), then loading back what was pushed."""
    out = _client(f"""
        import torch, timm, sglr_zoo
        from sglr_zoo import cli
        cli.main(["push", {str(run_dir)!r}, "--repo-id", "testorg/dry", "--dry-run"])
        cli.main(["push", {str(run_dir)!r}, "--repo-id", "testorg/pushed"])
        cli.main(["push", {str(run_dir)!r}, "--repo-id", "testorg/pushed", "--which", "last", "--revision", "dev"])
        cli.main(["push", {str(run_dir)!r}, "--repo-id", "testorg/pushed", "--which", "last", "--create-pr"])
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for which, hub_id in (("best", "hf-hub:testorg/pushed"), ("last", "hf-hub:testorg/pushed@dev")):
                expected = sglr_zoo.load({str(run_dir)!r} + "/" + which)(x)
                assert torch.equal(sglr_zoo.load(hub_id)(x), expected), hub_id
                assert torch.equal(timm.create_model(hub_id, pretrained=True).eval()(x), expected), hub_id
        print("OK")
        """, hub.url, tmp_path / "hf_home", HF_TOKEN="hf_test_token")
    assert out.rstrip().endswith("OK") and "done: " in out and "/discussions/1" in out
    dry_run = out.split("dry run: nothing uploaded")[0]  # --dry-run lists the files and sends nothing
    size = (run_dir / "best" / "model.safetensors").stat().st_size
    assert f"{size:,d}  model.safetensors" in dry_run and "README.md" in dry_run and "results.json" in dry_run
    assert "testorg/dry" not in hub.repos and not any("dry" in path for _, path in hub.requests)
    repo = hub.repos["testorg/pushed"]
    main = repo.commits[repo.refs["main"]]
    assert {"README.md", "model.safetensors", "config.json", "recipe.yaml", "results.json", "curves.png"} <= set(main)
    assert b"model-index" in main["README.md"] and main["model.safetensors"] == (
        run_dir / "best" / "model.safetensors").read_bytes()
    assert repo.commits[repo.refs["dev"]]["model.safetensors"] == (run_dir / "last" / "model.safetensors").read_bytes()
    assert "refs/pr/1" in repo.refs
