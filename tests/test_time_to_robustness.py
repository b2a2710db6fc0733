"""benchmarks/time_to_robustness.py: its presets, its commands, its report, and one toy grid end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sglr_zoo.budget import picked
from sglr_zoo.guard import fallback_attack
from sglr_zoo.recipe import load_recipe
from sglr_zoo.schedule import Plan, Plans
from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_robustness.py"


@pytest.fixture(scope="module")
def ttr():
    return TTR


TTR = load_script(SCRIPT, "time_to_robustness")


@pytest.mark.parametrize("preset", list(TTR.PRESETS))
def test_every_preset_is_a_valid_recipe_with_the_levers_its_name_says(ttr, preset):
    """`quickstart` is the recipe as it is (SGLR, N-FGSM, the budget picking the width, whether to augment and to
    average); the others name theirs."""
    recipe = load_recipe(ttr.RECIPE, ttr.PRESETS[preset])
    parts = preset.split("-")
    assert recipe.method.name == ("pgd_at" if parts[0] == "pgdat" else "sglr")
    nfgsm = "nfgsm" in parts or preset == "quickstart"
    assert (recipe.attack.noise, recipe.attack.project) == ((2.0, False) if nfgsm else (1.0, True))
    assert recipe.attack.steps == (2 if "pgd2" in parts else 1) and recipe.schedule.budget == "9m"
    if "pgd2" in parts:  # the guard's fallback attack, as its comment says
        assert recipe.attack == fallback_attack(load_recipe(ttr.RECIPE, []).attack, 2)
    decays = {"ema": 0.999, "ema998": 0.998, "ema993": 0.993, "quickstart": 0.998}  # the quickstart's: 10 epochs on
    assert recipe.average.decay == next((decays[part] for part in parts if part in decays), 0.0)
    if recipe.average.decay:  # the presets' averages are on at any length of run
        assert recipe.average.min_epochs == (10 if preset == "quickstart" else 0)
    assert recipe.method.label_smoothing == (0.4 if "ls" in parts else 0.0)
    assert recipe.data.augment == ("auto" if preset == "quickstart" else "aug" in parts)
    slim, quarter = "preactresnet10_slim_cifar", "preactresnet10_quarter_cifar"
    assert recipe.model.arch == ([slim, quarter] if preset == "quickstart" else slim if "slim" in parts else quarter)
    lr = 0.1 if "b64" in parts else 0.3 if "lr3" in parts else 0.2
    assert (recipe.run.batch_size, recipe.optim.lr) == ((64 if "b64" in parts else 128), lr)
    assert (recipe.attack.warmup, recipe.schedule.peak_at) == ((0.3 if "warmup" in parts else 0.0), 0.3)
    assert (recipe.method.alpha, recipe.method.start_epoch) == ((0.7 if "a7" in parts else 0.9), 0.6)


@pytest.mark.parametrize("budget, steps, preset", [("9m", 1368, "sglr-nfgsm-slim"),
                                                   ("30m", 4692, "sglr-nfgsm-slim-aug-ema998")])
def test_the_quickstart_trains_what_its_budgets_presets_measured(ttr, budget, steps, preset):
    """The README's command planned as on the CPU of docs/time_to_robustness.md (the slim model, 3.5 epochs in 9
    minutes, 12 in 30) is the preset measured there: no crops, flips or average at 9 minutes, all of them at 30."""
    plans = Plans([Plan(made_at=0, epochs=-(-steps // 391), steps=steps, start_epoch=1)], steps_per_epoch=391,
                  arch="preactresnet10_slim_cifar")
    schedule = f"schedule.budget={budget}"
    quickstart = picked(load_recipe(ttr.RECIPE, [schedule]), plans, print)
    measured = picked(load_recipe(ttr.RECIPE, [schedule, *ttr.PRESETS[preset]]), plans, print)
    assert quickstart.average.min_epochs == 10  # the one difference: a preset's average is on at any length
    measured = dataclasses.replace(measured, average=dataclasses.replace(measured.average, min_epochs=10))
    assert quickstart.to_dict() == measured.to_dict()


def test_dry_run_prints_one_train_command_per_preset_and_seed_in_priority_order(ttr, tmp_path, capsys):
    presets = list(ttr.PRESETS)
    ttr.main(["--dry-run", "--stage", "train", "--seeds", "0", "1", "--presets", *reversed(presets),
              "--out-dir", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("sglr-zoo train ") and "schedule.budget=9m" in line for line in lines)
    names = [word.removeprefix("run.name=") for line in lines for word in line.split() if word.startswith("run.name=")]
    assert names == [f"{preset}-s{seed}" for seed in (0, 1) for preset in presets]
    for line, preset in zip(lines, presets * 2):
        assert line.endswith(" ".join(["schedule.budget=9m", *ttr.PRESETS[preset]]))


def test_emulated_avx2_trainings_are_named_and_run_limited_to_avx2_kernels(ttr, tmp_path, monkeypatch):
    from sglr_zoo.hardware import AVX2_ONLY_ENV

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    [job] = ttr.plan_grid(["sglr-nfgsm"], [0], ["9m"], tmp_path, ttr.RECIPE, 500, [], emulate_avx2=True)
    assert job.name == "sglr-nfgsm-s0-avx2" and job.eval[1] == str(tmp_path / "sglr-nfgsm-s0-avx2" / "last")
    envs = []

    def stopped_training(args, log, env):
        envs.append(env)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("stopped\n")
        return 1, 0.0, 0.0

    monkeypatch.setattr(ttr, "run_logged", stopped_training)
    with pytest.raises(SystemExit, match="training sglr-nfgsm-s0-avx2"):
        ttr.train(job, tmp_path / "logs")
    [env] = envs
    assert AVX2_ONLY_ENV.items() <= env.items()
    [native] = ttr.plan_grid(["sglr-nfgsm"], [0], ["9m"], tmp_path, ttr.RECIPE, 500, [])
    with pytest.raises(SystemExit):
        ttr.train(native, tmp_path / "logs")
    assert "ONEDNN_MAX_CPU_ISA" not in envs[1]
    [older] = ttr.plan_grid(["sglr-nfgsm"], [0], ["9m"], tmp_path, ttr.RECIPE, 500, [], emulate_avx2=True, threads=1)
    assert older.name == "sglr-nfgsm-s0-avx2-t1" and older.train[-1] == "run.threads=1"
    assert ttr.cpu_info(True, 1)["train_threads"] == 1


def fabricated_run(preset: str, seed: int, autoattack: float | None, wall_s: float = 540.0,
                   emulated_avx2: bool = False, threads: int | None = None) -> dict:
    evaluation = None if autoattack is None else {"n": 500, "clean": 60.0 + seed, "pgd20": 35.0 + seed,
                                                  "autoattack": autoattack, "sanity_passed": True}
    return {"name": f"{preset}-s{seed}" + "-avx2" * emulated_avx2 + (f"-t{threads}" if threads else ""),
            "preset": preset, "seed": seed, "budget": "9m", "wall_s": wall_s, "peak_rss_mib": 1500.0 + seed,
            "cpu": {"model": "Test CPU", "cpus": 2, "avx512_bf16": True, "amx_bf16": False,
                    "emulated_avx2": emulated_avx2, "train_threads": threads},
            "eval": evaluation, "sanity_passed": True}


def test_report_counts_seeds_and_averages_per_preset(ttr, tmp_path, capsys):
    runs = [fabricated_run("sglr-nfgsm", 0, 30.0, 530.0), fabricated_run("sglr-nfgsm", 1, 32.0, 550.0),
            fabricated_run("sglr-fgsmrs", 0, 31.0), fabricated_run("sglr-fgsmrs", 1, None),  # seed 1: not evaluated
            fabricated_run("sglr-nfgsm", 0, 25.0, emulated_avx2=True),
            fabricated_run("sglr-nfgsm", 0, 20.0, emulated_avx2=True, threads=1)]
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"schema": ttr.SCHEMA, "runs": {run["name"]: run for run in runs}}))

    rows = ttr.aggregate(ttr.load_record(record))
    assert [row["preset"] for row in rows] == ["sglr-fgsmrs", *["sglr-nfgsm"] * 3]  # priority order
    baseline, nfgsm, emulated, one_thread = sorted(rows, key=lambda row: (row["preset"], row["cpus"]))
    assert emulated["autoattack"] == 25.0 and emulated["emulated_avx2"] and not nfgsm["emulated_avx2"]
    assert emulated["cpus"] == ["emulated AVX2-only on Test CPU, 2 CPUs, AVX512-BF16"]
    assert one_thread["autoattack"] == 20.0 and one_thread["train_threads"] == 1 and one_thread["cpus"] == [
        "emulated AVX2-only on Test CPU, 2 CPUs, AVX512-BF16, training on 1 thread"]
    assert baseline["seeds"] == [0] and baseline["autoattack"] == 31.0
    assert nfgsm["seeds"] == [0, 1] and nfgsm["autoattack_per_seed"] == [30.0, 32.0]
    assert (nfgsm["autoattack"], nfgsm["clean"], nfgsm["pgd20"]) == (31.0, 60.5, 35.5)
    assert nfgsm["wall_min"] == pytest.approx(9.0) and nfgsm["peak_rss_mib"] == 1501.0

    plot = tmp_path / "ttr.png"
    ttr.main(["--report", "--record", str(record), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "| sglr-nfgsm | 9m | 2 | 31.0 (30.0 / 32.0) | 60.5 (60.0 / 61.0) | 35.5 (35.0 / 36.0) | 9.0 | 1501 |" in out
    assert "Test CPU, 2 CPUs, AVX512-BF16" in out and "first 500" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_toy_grid_trains_evaluates_records_and_resumes(ttr, tiny_dataset, tmp_path, capsys):
    record = tmp_path / "record.json"
    args = ["--presets", "sglr-nfgsm", "--seeds", "0", "--budget", "10s", "--out-dir", str(tmp_path / "runs"),
            "--record", str(record), "--aa-n", "2", "--eval-jobs", "2",  # one thread per evaluation
            "--set", f"data.dataset={tiny_dataset}", "model.arch=preactresnet_tiny_cifar", "eval.n=8",
            "eval.final_n=16", "run.batch_size=16", "run.threads=1"]
    unfinished = tmp_path / "runs" / "sglr-nfgsm-s0-10s" / "checkpoints"
    unfinished.mkdir(parents=True)  # a killed training: set aside, trained afresh
    ttr.main(args)
    assert [p.name.startswith("sglr-nfgsm-s0-10s-") for p in (tmp_path / "runs" / ".killed").iterdir()] == [True]
    entry = json.loads(record.read_text())["runs"]["sglr-nfgsm-s0-10s"]
    assert entry["preset"] == "sglr-nfgsm" and entry["seed"] == 0 and entry["budget"] == "10s"
    assert entry["overrides"][:len(ttr.PRESETS["sglr-nfgsm"])] == ttr.PRESETS["sglr-nfgsm"]
    assert 0 < entry["wall_s"] < 120 and entry["peak_rss_mib"] > 100
    assert entry["cpu"]["model"] and entry["torch"] and entry["sglr_zoo_commit"]
    assert entry["plan"]["epochs"] >= 1 and entry["threads"] == 1 and entry["precision"] in ("bf16", "no")
    assert entry["trainer_eval"]["n"] == 16 and "pgd20" in entry["trainer_eval"]
    assert entry["eval"]["n"] == 2 and {"clean", "pgd20", "autoattack"} <= set(entry["eval"])
    assert isinstance(entry["sanity_passed"], bool) and "guard" in entry

    capsys.readouterr()
    ttr.main(args)  # finished: neither trained nor evaluated again
    assert "train " not in capsys.readouterr().out
    assert json.loads(record.read_text())["runs"]["sglr-nfgsm-s0-10s"]["wall_s"] == entry["wall_s"]
