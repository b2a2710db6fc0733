#!/usr/bin/env bash
# One lent GPU session, about 7 minutes on an H100 (issues 8 and 9), writing everything to $OUT:
#   check: benchmarks/gpu_check.py (WRN-34-10 and PreActResNet-18 PGD-10 throughput, MFU, the 200-epoch projection)
#   train: a short PreActResNet-18 SGLR run on a CIFAR-10 subset, sized by schedule.budget, with the levers the
#          check measured fastest; then AutoAttack (standard, first 500 test images) of its last export
#   wrn:   a short WRN-34-10 run of the trainer on the same subset: its own images/s with monitoring, for the
#          200-epoch projection (weights not brought back)
#   pack:  the run's small files as one tar and its weights split into raw byte parts under 16 MiB (the device tool
#          brings back at most 8 files of 16 MiB); `cat parts > model.safetensors` restores the file, same sha256.
#   zoo:   a GPU preset (recipes/*_fast.yaml) on all of CIFAR-10, one call's share at a time, resumable: checks the
#          staged data, trains (resuming from its checkpoint), brings the export back as safetensors shards,
#          AutoAttack (standard, first AA_N test images) with a state file (benchmarks/gpu_zoo.py). The limits make it
#          several calls: the 114 MB training parquet travels in parts beside the 35 MB of tracked files (64 MiB a
#          call), 4 back-to-back calls today, the last of which trains; a checkpoint (136 MB for PreActResNet-18,
#          556 MB for WRN-34-10) can neither come back nor be carried, so training resumes only on the warm machine
#          (given back after 30 s idle) and a preset's training is sized to one call; the weights come back as 4
#          shards (PreActResNet-18) or 14 (WRN-34-10, 4 calls); carried in with the AutoAttack state file, they let a
#          later session finish AutoAttack on the same weights. Plan and numbers: docs/zoo.md, "GPU presets".
#            python benchmarks/gpu_zoo.py stage-data --source ../shared/datasets/cifar10   # here: parts, carry lists
#            bash benchmarks/gpu_session.sh zoo                                            # there, call after call
#            python benchmarks/gpu_zoo.py receive FILES_AT                                 # here: tar, shards, join
# It runs where the GPU is, in a copy of the repository with these carried (ignored) folders:
#   .whl/              wheels missing on the device image: datasets, dill, multiprocess, fsspec, pyautoattack (the
#                      last repacked without its 42 MB examples folder)
#   .gpu_data/cifar10/ uoft-cs/cifar10's parquet layout, train rows 0 to N_TRAIN-1 and 49000-49999 (so that
#                      data.n_train=N_TRAIN data.val_size=1000 selects the same images as on the full set), test
#                      rows 0-999
#   .gpu_data/zoo/     the zoo stage's data: CIFAR-10 in parts that fit one call each, and their manifest
#     bash benchmarks/gpu_session.sh [check] [train] [wrn] [pack] [zoo]      # default: check train pack
# Environment: N_TRAIN (default 12000), CHECK_BUDGET (s, default 150), TRAIN_BUDGET and WRN_BUDGET (default 120s),
# AA_TIMEOUT (s, default 120; zoo: the call's budget), CHECK_JSON (an earlier check's results). The zoo stage:
# ZOO_RECIPE (default recipes/prn18_cifar10_fast.yaml), ZOO_NAME (the run's name, default the recipe's stem),
# ZOO_SET (recipe overrides, space-separated key=value), ZOO_BUDGET (s the whole call may take, default 540 of the
# command's 600), AA_N (default 500), SHARD_MIB (tensor bytes a shard, default 14), ZOO_RETURN_MIB,
# ZOO_RETURN_FILES and ZOO_FILE_MIB (what may come back, default 64, 8 and 16), ZOO_DATA (default .gpu_data/zoo).
set -uo pipefail
export PYTHONUNBUFFERED=1 SGLR_ZOO_DATA=$PWD/.gpu_data
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
stages=${*:-check train pack}
RUN=runs/gpu/prn18_c10sub_sglr
TRAIN_BUDGET=${TRAIN_BUDGET:-120s}
WRN_BUDGET=${WRN_BUDGET:-120s}
N_TRAIN=${N_TRAIN:-12000}  # 12,000 + 1,000 rows keep the carried files under 64 MiB with the bundled zoo weights
CHECK_BUDGET=${CHECK_BUDGET:-150}
ZOO_AA_TIMEOUT=${AA_TIMEOUT:-0}  # read before the train stage's default: 0 = what the zoo call's budget leaves
AA_TIMEOUT=${AA_TIMEOUT:-120}

if [ -d .whl ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:$site
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import sys, torch, timm, accelerate, datasets, pyarrow, huggingface_hub, safetensors; print('python',
sys.version.split()[0], *(f'{m.__name__} {m.__version__}' for m in (torch, timm, accelerate, datasets, pyarrow,
huggingface_hub, safetensors)))" || exit 1

if [[ $stages == *check* ]]; then
  timeout $((CHECK_BUDGET + 30)) python3 benchmarks/gpu_check.py --seconds 4 --budget "$CHECK_BUDGET" --json "$OUT/gpu_check.jsonl" \
    2>&1 | tee "$OUT/gpu_check.log"
fi

# fastest ARCH LEVER: LEVER's value (true/false) in the check's fastest eager bf16 step of ARCH; false when the
# check did not run.
fastest() {
  python3 - "${CHECK_JSON:-$OUT/gpu_check.jsonl}" "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
path, arch, lever = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
rows = [r for r in rows if r["arch"] == arch and r["precision"] == "bf16" and not r["compile"]]
print(str(bool(rows and max(rows, key=lambda r: r["img_per_s"]).get(lever))).lower())
EOF
}

if [[ $stages == *train* ]]; then
  # The levers the check measured fastest on PreActResNet-18 in bf16; no compile: its minute of compilation, paid
  # twice (the budget's timing probe and the run), does not pay back in two minutes.
  python3 -m sglr_zoo.cli train recipes/prn18_cifar10.yaml data.n_train=$N_TRAIN data.val_size=1000 \
    schedule.name=cosine schedule.budget="$TRAIN_BUDGET" method.start_epoch=0.45 eval.n=500 eval.every=2 \
    eval.final_attacks=[clean,pgd20] eval.final_n=1000 run.compile=false \
    run.channels_last="$(fastest preactresnet18_cifar channels_last)" \
    run.cudnn_benchmark="$(fastest preactresnet18_cifar cudnn_benchmark)" \
    run.output_dir=runs/gpu run.name=prn18_c10sub_sglr 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" \
    | tee "$OUT/train.log"
  timeout "$AA_TIMEOUT" python3 -m sglr_zoo.cli eval "$RUN/last" --attacks clean,pgd20,cw20,autoattack --n 500 \
    --state-path "$RUN/autoattack_state_n500.json" --out "$RUN/results_aa_n500.json" 2>&1 | tr '\r' '\n' \
    | grep -v "it/s\]\|s/it\]" | tee "$OUT/aa.log"
fi

if [[ $stages == *wrn* ]]; then
  # The trainer's own WRN-34-10 throughput, monitoring included (the recipe's eval.n=1000 on train, val and test
  # every epoch), for the 200-epoch projection: a short run sized by schedule.budget, eager, with the levers the
  # check measured fastest. Its weights stay on the device.
  python3 -m sglr_zoo.cli train recipes/wrn34_cifar10.yaml data.n_train=$N_TRAIN data.val_size=1000 \
    schedule.name=cosine schedule.budget="$WRN_BUDGET" method.start_epoch=0.45 eval.final_attacks=[clean] \
    eval.final_n=1000 run.compile=false \
    run.channels_last="$(fastest wrn34_10_cifar channels_last)" \
    run.cudnn_benchmark="$(fastest wrn34_10_cifar cudnn_benchmark)" \
    run.output_dir=runs/gpu run.name=wrn34_c10sub_sglr 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" \
    | tee "$OUT/wrn_train.log"
  tar czf "$OUT/wrn_run.tgz" --exclude=checkpoints --exclude='*.safetensors' runs/gpu/wrn34_c10sub_sglr
fi

if [[ $stages == *zoo* ]]; then
  # One call's share of training and evaluating a GPU preset; each step an earlier call did is skipped.
  # shellcheck disable=SC2086  # ZOO_SET: one recipe override a word
  python3 benchmarks/gpu_zoo.py device "${ZOO_RECIPE:-recipes/prn18_cifar10_fast.yaml}" \
    ${ZOO_NAME:+--name "$ZOO_NAME"} --out "$OUT" --budget $((${ZOO_BUDGET:-540} - SECONDS)) --aa-n "${AA_N:-500}" \
    --aa-timeout "$ZOO_AA_TIMEOUT" --shard-mib "${SHARD_MIB:-14}" --return-mib "${ZOO_RETURN_MIB:-64}" \
    --return-files "${ZOO_RETURN_FILES:-8}" --file-mib "${ZOO_FILE_MIB:-16}" --data-root "${ZOO_DATA:-.gpu_data/zoo}" \
    ${ZOO_SET:+--set $ZOO_SET} 2>&1 | tee -a "$OUT/zoo.log"
  zoo_rc=${PIPESTATUS[0]}
fi

if [[ $stages == *pack* ]] && [ -f "$RUN/last/model.safetensors" ]; then
  sha256sum "$RUN/last/model.safetensors" | tee "$OUT/last.sha256"
  split -b 15m -d "$RUN/last/model.safetensors" "$OUT/last.safetensors.part"
  tar czf "$OUT/run.tgz" --exclude=checkpoints --exclude='*.safetensors' "$RUN"
fi
ls -la "$OUT"
exit "${zoo_rc:-0}"
