"""The `sglr-zoo` command: a user's mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm

from sglr_zoo.cli import main

REPO = Path(__file__).resolve().parents[1]

# A valid recipe that would train for at most one step on a tiny model.
TINY_RECIPE = """\
data:
  dataset: {dataset}
  n_train: 8
  n_test: 8
model:
  arch: {arch}
schedule:
  epochs: 1
  milestones: []
method:
  start_epoch: 0.5
eval:
  n: 8
  steps: 1
run:
  output_dir: {output_dir}
  batch_size: 8
  max_steps: 1
  mixed_precision: "no"
"""


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str, command: str = "train") -> None:
    assert code == 2
    assert "Traceback" not in err
    # Libraries may draw progress bars on stderr before the error; the error itself is one last line.
    lines = err.strip().splitlines()
    assert sum("error:" in line for line in lines) == 1, err
    assert lines[-1].startswith(f"sglr-zoo {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1]


# (name, recipe text or None for a missing file, fragments the error line must hold besides the file)
RECIPE_ERRORS = [
    ("missing file", None, ["not found"]),
    ("malformed yaml", "schedule: [1, 2\nrun: {seed: 0}\n", ["malformed YAML", "line"]),
    ("unknown key", "schedule:\n  epoch: 3\n", ["unknown key schedule.epoch"]),
    ("wrong type", "attack:\n  steps: many\n", ["attack.steps"]),
]


@pytest.mark.parametrize("text, fragments", [e[1:] for e in RECIPE_ERRORS], ids=[e[0] for e in RECIPE_ERRORS])
def test_recipe_errors(tmp_path, capsys, text, fragments):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    code, _, err = run_main(["train", str(path)], capsys)
    assert_one_line_error(code, err, str(path), *fragments)


def test_bad_override(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("run: {seed: 0}\n")
    code, _, err = run_main(["train", str(path), "schedule.epochs"], capsys)
    assert_one_line_error(code, err, "schedule.epochs", "key.sub=value")


def test_dataset_without_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(dataset=empty, arch="resnet_tiny_cifar", output_dir=tmp_path / "runs"))
    code, _, err = run_main(["train", str(path)], capsys)
    assert_one_line_error(code, err, "data.dataset", str(empty))


@pytest.mark.parametrize("override, fragment", [
    ("run.seed=-1", "run.seed: must be in [0, 2**32 - 1]"),
    ("run.seed=4294967296", "run.seed: must be in [0, 2**32 - 1]"),
    ("optim.lr=1e300", "optim.lr: must be in (0, 10]"),
    ("run.threads=1000000", "run.threads: must be auto or in [1, 4096]"),
    ("data.image_size=100000", "data.image_size: must be in [8, 1024]"),
    ("run.num_workers=100000", "run.num_workers: must be in [0, 256]"),
    ("attack.eps=5", "attack.eps: 5 is more than 1"),
])
def test_out_of_range_numbers_are_one_line(tmp_path, capsys, tiny_dataset, override, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(dataset=tiny_dataset, arch="resnet_tiny_cifar", output_dir=tmp_path / "runs"))
    code, _, err = run_main(["train", str(path), override], capsys)
    assert_one_line_error(code, err, str(path), fragment)


def test_header_only_csv_is_one_line(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("image,label\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(dataset=tmp_path / "labels.csv", arch="resnet_tiny_cifar",
                                       output_dir=tmp_path / "runs"))
    code, _, err = run_main(["train", str(path)], capsys)
    assert_one_line_error(code, err, f"data.dataset: {tmp_path / 'labels.csv'} has a header but no rows")


def test_unknown_architecture(tmp_path, capsys, tiny_dataset):
    path = tmp_path / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(dataset=tiny_dataset, arch="resnet_tiny_cifar", output_dir=tmp_path / "runs"))
    code, _, err = run_main(["train", str(path), "model.arch=not_a_model"], capsys)
    assert_one_line_error(code, err, "model.arch", "not_a_model")


def test_subprocess_error_is_one_line(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([sys.executable, "-m", "sglr_zoo.cli", "train", str(missing)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"sglr-zoo train: error: recipe file {missing} not found; "
                                                  "see recipes/ for examples"]


@pytest.mark.parametrize("command, hint", [("train", "rerun the same command to resume"),
                                           ("eval", "with --state-path FILE, a rerun with the same file resumes")])
def test_interrupt_says_how_to_resume(monkeypatch, capsys, command, hint):
    from sglr_zoo import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"_{command}", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "recipes/quickstart_cifar10.yaml" if command == "train" else "quickstart-sglr"])
    assert exit_info.value.code == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"sglr-zoo {command}: interrupted; {hint}")


def test_eval_of_a_broken_model_folder_is_one_line(tmp_path, tiny_dataset):
    from sglr_zoo.models import create_model, save_pretrained

    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    (folder / "config.json").write_text("null")
    result = subprocess.run([sys.executable, "-m", "sglr_zoo.cli", "eval", str(folder), "--dataset",
                             str(tiny_dataset), "--n", "4", "--attacks", "clean", "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, str(folder / "config.json"), "expected a JSON object",
                          command="eval")


def test_warnings_are_one_line(tmp_path, tiny_dataset):
    from sglr_zoo.models import create_model, save_pretrained

    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    result = subprocess.run([sys.executable, "-m", "sglr_zoo.cli", "eval", str(folder), "--dataset",
                             str(tiny_dataset), "--n", "100000", "--attacks", "clean", "--out",
                             str(tmp_path / "r.json")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "Warning" in line]
    assert warned and warned[0].startswith("UserWarning: data.n_test: 100000 examples asked for")
    assert "warnings.warn" not in result.stderr and "load_splits(" not in result.stderr


def test_push_dry_run_states_the_visibility(tmp_path, capsys):
    from sglr_zoo.models import create_model, save_pretrained

    folder = save_pretrained(create_model("preactresnet_tiny_cifar", 10), tmp_path / "model")
    main(["push", str(folder), "--repo-id", "org/model", "--dry-run"])
    out = capsys.readouterr().out
    assert "dry run: org/model would be a PUBLIC repo" in out and "(pass --private for a private repo)" in out
    main(["push", str(folder), "--repo-id", "org/model", "--dry-run", "--private"])
    assert "dry run: org/model would be a private repo if this push created it (--private)" in capsys.readouterr().out


def test_list(capsys):
    main(["list"])
    out = capsys.readouterr().out.split()
    assert set(timm.list_models("*_cifar")) <= set(out)
    assert {"wrn34_10_cifar", "preactresnet18_cifar", "resnet18_cifar", "preactresnet10_slim_cifar"} <= set(out)


@pytest.mark.parametrize("argv, message", [
    ([], "sglr-zoo: error: the following arguments are required: COMMAND"),
    (["no-such-command"], "sglr-zoo: error: argument COMMAND: invalid choice"),
    (["train"], "sglr-zoo train: error: the following arguments are required: recipe\n"),  # overrides are optional
    (["train", "r.yaml", "--budget", "4"], "usage: sglr-zoo train [-h] recipe"),  # the command's own usage
])
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err
