"""GPU check, at most 8 minutes: PGD-10 training throughput of WRN-34-10 and PreActResNet-18 in bf16 and fp32, with
torch.compile off and on, the MFU against the card's bf16 peak, and the projected hours of the 200-epoch WRN-34-10
recipe (issue 8: WRN-34-10 PGD-10 at >= 40% MFU; the recipe in under 4 hours on one H100).

The step is the trainer's (benchmarks/train_throughput.py: `make_our_step`, SGLR after its start epoch), on the
recipe's batch; each configuration runs warm-up steps (compilation included, reported as 1st_s) and then timed
steps for about --seconds. Configurations run most important first and are skipped, and said so, when the time
left cannot fit them. MFU = counted conv/matmul FLOPs per image (torch.utils.flop_counter) x img/s / peak, against
the card's dense bf16 peak from its data sheet (CARD_BF16_TFLOPS) and against a measured 8192^3 bf16 matmul.

    python benchmarks/gpu_check.py                        # on a GPU machine; prints a table, --json for the records
    python benchmarks/gpu_check.py --tiny                 # the CPU check of this script: tiny models, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import REPO, make_our_step  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against the device name.
CARD_BF16_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 NVL": 835, "H100 PCIe": 756,
                    "GH200": 989, "B200": 2250, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70,
                    "A10": 125, "RTX 4090": 165, "RTX 3090": 71}
BUDGET_S = 8 * 60


def card_peak(name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s (the longest matching key), or None for an unknown card."""
    matches = [key for key in CARD_BF16_TFLOPS if key in name]
    return CARD_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


def measured_peak(device: torch.device, n: int) -> float:
    """FLOP/s of the best of 5 n x n x n bf16 matmuls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ a
    best = math.inf
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        a @ a
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # accelerate allows one mixed-precision setting per process otherwise
    GradientState._reset_state()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def flops_per_image(arch: str, pgd_steps: int, device: torch.device, batch: int = 4) -> float:
    """Counted conv/matmul FLOPs per image of one training step (fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    _reset()
    step, _ = make_our_step(arch, {"mixed_precision": "no", "channels_last": False, "compile": False}, "sglr", batch,
                            pgd_steps, device)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels, index = torch.randint(0, 10, (batch,), device=device), torch.arange(batch, device=device)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModTracker()
    with counter:
        step(images, labels, index, [])
    return counter.get_total_flops() / batch


class _NoModTracker:
    """FlopCounterMode's module tracker breaks torch.autograd.grad on a leaf input; only the totals are needed."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure(arch: str, precision: str, compile_: bool, channels_last: bool, cudnn_benchmark: bool, batch: int,
            pgd_steps: int, device: torch.device, warmup: int, seconds: float) -> dict:
    """Images/s of the trainer's step over timed steps after `warmup` steps; peak memory per step."""
    _reset()
    settings = {"mixed_precision": precision, "compile": compile_, "channels_last": channels_last,
                "cudnn_benchmark": cudnn_benchmark}
    step, levers = make_our_step(arch, settings, "sglr", batch, pgd_steps, device)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels, index = torch.randint(0, 10, (batch,), device=device), torch.arange(batch, device=device)
    parts: list[tuple[float, float]] = []
    _sync(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step(images, labels, index, parts)
    _sync(device)
    first_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, started = 0, time.perf_counter()
    while steps < 3 or (time.perf_counter() - started < seconds and steps < 200):
        step(images, labels, index, parts)
        steps += 1
    _sync(device)
    elapsed = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"arch": arch, "precision": precision, "compile": compile_, "channels_last": channels_last,
            "cudnn_benchmark": cudnn_benchmark, "batch": batch, "pgd_steps": pgd_steps,
            "img_per_s": batch * steps / elapsed, "timed_steps": steps, "warmup_s": first_s, "peak_mem_gib": memory,
            "levers": levers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches: checks the script on a CPU")
    parser.add_argument("--seconds", type=float, default=20, help="timed seconds per configuration")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--json", help="append every result as one JSON line to this file")
    args = parser.parse_args()
    started = time.perf_counter()

    from sglr_zoo.recipe import load_recipe

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    recipe = load_recipe(REPO / "recipes" / "wrn34_cifar10.yaml")
    pgd_steps, batch = recipe.attack.steps, recipe.run.batch_size
    archs = {"wrn34_10_cifar": "wrn34_10_cifar", "preactresnet18_cifar": "preactresnet18_cifar"}
    warmup, seconds, peak_n = 3, args.seconds, 8192
    if args.tiny:
        archs = {"wrn34_10_cifar": "wrn_tiny_cifar", "preactresnet18_cifar": "preactresnet_tiny_cifar"}
        pgd_steps, batch, warmup, seconds, peak_n = 2, 16, 1, 1.0, 512
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--tiny check)"
    spec = card_peak(name) if device.type == "cuda" else None
    measured = measured_peak(device, peak_n)
    print(f"# {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; batch {batch}, PGD-{pgd_steps}, "
          f"SGLR step; bf16 peak: data sheet {spec / 1e12 if spec else float('nan'):.0f}, measured "
          f"{measured / 1e12:.1f} TFLOP/s; tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn tf32 "
          f"{torch.backends.cudnn.allow_tf32}", flush=True)
    flops = {arch: flops_per_image(model, pgd_steps, device) for arch, model in archs.items()}
    print("# step GFLOP per image: " + ", ".join(f"{arch} {f / 1e9:.1f}" for arch, f in flops.items()), flush=True)

    # Most important first. Measured on an H100 (benchmarks/RESULTS.md): eager bf16 with channels_last was the fastest
    # WRN-34-10 setting; not yet measured: cuDNN's algorithm search (cudnn.benchmark) and WRN-34-10 compiled (about
    # a minute of compilation). Then the rest of the grid. (arch, precision, compile, channels_last, cudnn_benchmark)
    wrn, prn = "wrn34_10_cifar", "preactresnet18_cifar"
    plan = [(wrn, "bf16", False, True, False), (wrn, "bf16", False, True, True), (wrn, "bf16", True, True, True),
            (prn, "bf16", False, True, False), (prn, "bf16", False, True, True), (prn, "bf16", True, True, True),
            (wrn, "no", False, True, True), (wrn, "no", True, True, True), (prn, "no", False, True, True),
            (prn, "no", True, True, True), (wrn, "bf16", False, False, True), (prn, "bf16", False, False, True)]
    print(f"\n{'arch':<22}{'precision':<10}{'compile':<8}{'cl':<6}{'cudnn':<6}{'img/s':>9}{'MFU sheet':>10}{'MFU meas':>10}"
          f"{'1st_s':>8}{'mem GiB':>9}{'epoch s':>9}", flush=True)
    results, expected = [], {}
    for arch, precision, compile_, channels_last, cudnn_benchmark in plan:
        head = f"{arch:<22}{precision:<10}{str(compile_):<8}{str(channels_last):<6}{str(cudnn_benchmark):<6}"
        left = args.budget - (time.perf_counter() - started)
        guess = expected.get((arch, compile_), 75 if compile_ else 20) if not args.tiny else 5
        if left < guess:
            print(f"{head} skipped: {left:.0f} s left, about {guess:.0f} s needed", flush=True)
            continue
        clock = time.perf_counter()
        try:
            r = measure(archs[arch], precision, compile_, channels_last, cudnn_benchmark, batch, pgd_steps, device,
                        warmup, seconds)
        except Exception as error:  # keep going: one failing configuration (e.g. a compile error) is a result too
            print(f"{head} FAILED: {type(error).__name__}: {error}"[:300], flush=True)
            continue
        expected[(arch, compile_)] = time.perf_counter() - clock
        r["arch"], r["model"] = arch, archs[arch]  # the model is a tiny stand-in with --tiny
        r["mfu_sheet"] = flops[arch] * r["img_per_s"] / spec if spec else float("nan")
        r["mfu_measured"] = flops[arch] * r["img_per_s"] / measured
        r["epoch_s"] = 50_000 / r["img_per_s"]
        results.append(r)
        print(f"{head}{r['img_per_s']:>9.1f}{100 * r['mfu_sheet']:>9.1f}%"
              f"{100 * r['mfu_measured']:>9.1f}%{r['warmup_s']:>8.1f}{r['peak_mem_gib']:>9.2f}{r['epoch_s']:>9.1f}",
              flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"device": name, "gflop_per_img": flops[arch] / 1e9, **r}) + "\n")

    wrn = [r for r in results if r["arch"] == "wrn34_10_cifar" and r["precision"] == "bf16"]
    if wrn:
        fastest = max(wrn, key=lambda r: r["img_per_s"])
        # Per epoch: the training set, plus the monitoring (eval.n images of train, test and val if any: clean +
        # PGD eval.steps, fp32). A training image costs about pgd_steps + 2 forward-backward passes, a monitored one
        # eval.steps + 2, in fp32 taken as 3x slower than bf16: an estimate, not measured.
        splits = 3 if recipe.data.val_size else 2
        monitor_s = splits * recipe.eval.n * (recipe.eval.steps + 2) / (pgd_steps + 2) * 3 / fastest["img_per_s"]
        hours = recipe.schedule.epochs * (50_000 / fastest["img_per_s"] + monitor_s) / 3600
        print(f"\n# WRN-34-10 {recipe.schedule.epochs}-epoch recipe (recipes/wrn34_cifar10.yaml), at the fastest bf16 "
              f"setting (compile {fastest['compile']}, channels_last {fastest['channels_last']}, cudnn.benchmark "
              f"{fastest['cudnn_benchmark']}): {hours:.2f} h "
              f"projected (target < 4 h on one H100); MFU {100 * fastest['mfu_sheet']:.1f}% of the data-sheet peak "
              "(target >= 40%)", flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
