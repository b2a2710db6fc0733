"""Training throughput of `sglr_zoo.training.train` against the reference PGD-AT step, measured in the same run.

The reference is shared/bench/ref_pgd_at.py (plain PyTorch, fixed tensors, no data loading): our number is
the whole trainer's epoch (data, augmentation, attack, objective, logging), so the ratio is conservative.

    python benchmarks/train_throughput.py --arch preactresnet18_cifar --ref-model prn18 --steps 10 --batch 128
    python benchmarks/train_throughput.py --variant bf16_cl --method sglr   # SGLR's extra clean forward included
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_parquet_dataset  # noqa: E402

from sglr_zoo.recipe import from_dict  # noqa: E402
from sglr_zoo.training import train  # noqa: E402


def load_reference(path: Path):
    spec = importlib.util.spec_from_file_location("ref_pgd_at", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_img_per_s(ref, model_name: str, variant: str, batch: int, pgd_steps: int, timed: int) -> float:
    """Median images/s of the reference step over `timed` steps after one warm-up step."""
    result = ref.bench_train(model_name, variant, batch, 1, timed, "ref", pgd_steps)
    return batch / result["t_med"]


def ours_img_per_s(arch: str, variant: str, method: str, batch: int, pgd_steps: int, n_steps: int, work: Path) -> float:
    """Images/s of the trainer's second epoch (the first one warms up), from its metrics.csv."""
    data = write_parquet_dataset(work / "data", n_train=batch * n_steps, n_test=16)
    recipe = from_dict({
        "data": {"dataset": str(data)},
        "model": {"arch": arch},
        "attack": {"steps": pgd_steps},
        "method": {"name": method, "start_epoch": 1},
        "schedule": {"epochs": 2, "name": "constant"},
        "eval": {"n": 16, "steps": 1, "every": 100, "final_attacks": ["clean"], "final_n": 16},
        "run": {"output_dir": str(work / "runs"), "name": "bench", "batch_size": batch,
                "mixed_precision": "bf16" if "bf16" in variant else "no", "channels_last": "cl" in variant.split("_"),
                "checkpoint_every": 100},
    })
    run_dir = train(recipe)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return float(rows[-1]["img_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="preactresnet18_cifar", help="our timm name")
    parser.add_argument("--ref-model", default="prn18", help="the same architecture in ref_pgd_at.py")
    parser.add_argument("--variant", default="bf16_cl", choices=["fp32", "cl", "bf16", "bf16_cl"])
    parser.add_argument("--method", default="pgd_at", choices=["pgd_at", "sglr", "trades"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--n-steps", type=int, default=4, help="training steps timed per epoch")
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "bench" / "ref_pgd_at.py"))
    args = parser.parse_args()

    ref = load_reference(Path(args.reference))
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}")
    reference = reference_img_per_s(ref, args.ref_model, args.variant, args.batch, args.steps, args.n_steps)
    with tempfile.TemporaryDirectory() as work:
        ours = ours_img_per_s(args.arch, args.variant, args.method, args.batch, args.steps, args.n_steps, Path(work))
    print(f"{'arch':<24}{'variant':<9}{'method':<8}{'batch':>6}{'pgd':>4}{'ref img/s':>11}{'ours img/s':>12}{'ratio':>7}")
    print(f"{args.arch:<24}{args.variant:<9}{args.method:<8}{args.batch:>6}{args.steps:>4}{reference:>11.1f}{ours:>12.1f}"
          f"{ours / reference:>7.2f}")


if __name__ == "__main__":
    main()
