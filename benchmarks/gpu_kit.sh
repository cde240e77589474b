#!/usr/bin/env bash
# The one-shot GPU kit: on a bare GPU machine that has only torch and timm, install the carried wheels, run
# the GPU test tier, then time our GC ViT against timm's (bf16, eager and compiled) and write one JSON per
# benchmark under benchmarks/results/ (copied to OUT_DIR too). Without CUDA every GPU step says so in one
# line and is skipped.
#
#   bash benchmarks/gpu_kit.sh [OUT_DIR]        # OUT_DIR (default: benchmarks/results/kit-<date>) gets the logs
#
# Wheels: the machine needs hydra-core, omegaconf and antlr4-python3-runtime (the trainer tests); prepare them
# on a machine with a package index, in the repository root (pure-Python wheels, any platform):
#   pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # published as an sdist only
# wandb is optional (W&B stays disabled). DALI (optional: its GPU tests skip without it) is ~190 MB, more
# than one transfer carries: split the wheel into numbered folders and carry one per call, back to back
# (a warm machine keeps what earlier calls carried); the kit joins the parts in order:
#   split -b 60M -d nvidia_dali_cuda130-*.whl part; for p in part*; do mkdir -p .dali/$p; mv $p .dali/$p/; done
#   echo nvidia_dali_cuda130-*.whl > .dali/NAME      # the wheel's file name, carried with the last part
# DALI's own dependencies that such a machine lacks (astunparse, gast, libcst, makefun, nvtx,
# nvidia-libnvcomp-cu13, nvidia-nvimgcodec-cu13) go into .whl as wheels for Python 3.12 manylinux x86_64.
# Environment: GCVIT_COMMIT names the commit where .git is absent;
# KIT_MODELS (default gcvit_tiny), KIT_BATCH (default 128) and KIT_COMPILE (default 1) choose what the
# benchmarks time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/kit-$(date -u +%Y%m%d-%H%M)}
RESULTS=benchmarks/results
mkdir -p "$OUT" "$RESULTS"
# data/ installs as gcvit_data (setup.cfg); the kit runs from the checkout uninstalled, so a link names it
mkdir -p /tmp/gcvit-src && ln -sfn "$PWD/data" /tmp/gcvit-src/gcvit_data
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/gcvit-src${PYTHONPATH:+:$PYTHONPATH}"
unset HYDRA_FULL_ERROR  # the one-line-error tests read the plain messages
STAMP=$(date -u +%Y%m%d-%H%M)
status=0
step() { echo "=== $(date -u +%H:%M:%S) $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    step "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gcvit-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/gcvit-site"
fi
if [ -f .dali/NAME ]; then
    wheel=/tmp/$(cat .dali/NAME)
    cat .dali/part*/part* > "$wheel"
    step "installing DALI from $(ls -d .dali/part* | wc -l) carried parts: $(basename "$wheel")"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gcvit-site "$wheel" || status=1
    export PYTHONPATH="$PYTHONPATH:/tmp/gcvit-site"
fi
python3 - <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      + (f"{torch.cuda.get_device_name()} (cuDNN {torch.backends.cudnn.version()})" if torch.cuda.is_available()
         else "no CUDA device: the GPU steps below skip"))
missing = [m for m in ("hydra", "omegaconf", "timm") if importlib.util.find_spec(m) is None]
print("missing packages (the trainer tests need them): " + ", ".join(missing) if missing else "packages: ok")
EOF
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
[ "$cuda" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# The preflight check first (under a minute): versions, GPUs, DALI's GPU decode, the interconnect and an
# all-reduce over every GPU of the machine, the demo data read, disk, W&B. Table in OUT, JSON in RESULTS
# (in OUT only without CUDA: a CPU dry run records nothing).
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
doctor=(python3)
[ "$ngpu" -gt 1 ] && doctor=(python3 -m torch.distributed.run --standalone --nproc_per_node="$ngpu")
report="$OUT/doctor.json"
[ "$cuda" = 1 ] && report="$RESULTS/gpu-doctor-$STAMP.json"
step "doctor on $ngpu GPU(s) -> $report"
timeout 300 "${doctor[@]}" -m gcvit.doctor trainer.device=auto trainer.precision=bf16 \
    trainer.output_dir=/tmp/gcvit-doctor-run --json "$report" 2>&1 | tee "$OUT/doctor.log" || status=1
[ "$cuda" = 1 ] && cp "$report" "$OUT/"

tier() {  # tier NAME PYTEST-ARGS...: a part of tests/gpu, its log in OUT
    local name=$1; shift
    step "GPU test tier: $name"
    timeout 600 python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu-tests-$name.log" || status=1
}
# The tests first (about 2 + 2 minutes on an H200), then the eager benchmark (1 minute), then the compiled
# one (about 5 minutes, mostly compiling both models: KIT_COMPILE=0 leaves it out on a short lease).
tier main tests/gpu --ignore tests/gpu/test_gpu_train.py
tier train tests/gpu/test_gpu_train.py
if [ "$cuda" = 1 ]; then
    modes="eager"; [ "${KIT_COMPILE:-1}" = 1 ] && modes="eager compiled"
    for model in ${KIT_MODELS:-gcvit_tiny}; do
        for mode in $modes; do
            flags=(--model "$model" --compare timm --batch "${KIT_BATCH:-128}" --precision bf16 --iters 10)
            if [ "$mode" = compiled ]; then flags+=(--compile --steps train --warmup 3 --repeats 3); fi
            json="$RESULTS/gpu-$model-bf16-$mode-$STAMP.json"
            step "benchmark $model bf16 $mode -> $json"
            timeout 600 python3 -m gcvit.bench "${flags[@]}" --json-out "$json" 2>&1 | tee -a "$OUT/bench.log" \
                || status=1
            cp "$json" "$OUT/" 2>/dev/null
            if [ "$mode" = eager ]; then  # what each candidate change would gain, and the top kernels (< 1 min)
                json="$RESULTS/gpu-$model-bf16-step-variants-$STAMP.json"
                step "step variants of $model (attention math, mixed LayerNorm, drop path on kept samples) -> $json"
                timeout 300 python3 benchmarks/profile_step.py --model "$model" --batch "${KIT_BATCH:-128}" \
                    --json-out "$json" 2>&1 | tee "$OUT/profile-step-$model.txt" || status=1
                cp "$json" "$OUT/" 2>/dev/null
            fi
        done
    done
    if python3 -c "import nvidia.dali" 2>/dev/null; then
        # the data path at GPU speed: nvJPEG decode + GPU ops, full recipe, on 2,000 generated ImageNet-sized
        # JPEGs (the lent machine has no dataset), against the torch loader with as many workers
        data_root=/tmp/gcvit-kit-jpegs
        [ -d "$data_root" ] || python3 -c "from pathlib import Path; from gcvit_data.demo import write_image_folder; \
write_image_folder(Path('$data_root'), train_per_class=200, val_per_class=1, num_classes=10, sizes=(375, 500))"
        json="$RESULTS/gpu-data-bench-$STAMP.json"
        step "data benchmark: DALI gpu pipeline vs torch loader, full recipe -> $json"
        timeout 600 python3 -m gcvit_data.bench --root "$data_root/train" --dali-device gpu --threads "$(nproc)" \
            --batch 128 --batches 20 --rounds 2 --rand-augment rand-m9-mstd0.5-inc1 --json-out "$json" \
            2>&1 | tee "$OUT/data-bench.log" || status=1
        cp "$json" "$OUT/" 2>/dev/null
        # the training thread's share of the loader between real bf16 steps (goal: <= 10 us per image)
        json="$RESULTS/gpu-feeder-$STAMP.jsonl"
        step "training thread's loader cost, DALI gpu pipeline between gcvit_tiny steps -> $json"
        timeout 300 python3 -m gcvit_data.bench_feeder --root "$data_root/train" --dali-device gpu \
            --precision bf16 --threads "$(nproc)" --feeder-workers 0 4 --batch 128 --step-ms 500 --batches 10 \
            2>"$OUT/feeder-bench.log" | tee "$json" || status=1
        cp "$json" "$OUT/" 2>/dev/null
    else
        step "data benchmark: DALI is not installed (carry it in .dali/), skipped"
    fi
else
    step "benchmarks: no CUDA device, skipped (they time bf16 training on a GPU)"
fi
step "done (status $status)"
exit $status
