#!/usr/bin/env bash
# The one-shot GPU kit: on a bare GPU machine that has only torch and timm, install the carried wheels, run
# the GPU test tier, then time every kernel candidate of our GC ViT against timm's (bf16, eager and compiled:
# benchmarks/kernel_candidates.py) and the data path, writing one JSON per benchmark under benchmarks/results/
# (copied to OUT_DIR too). Without CUDA every GPU step says so in one line and is skipped.
#
#   bash benchmarks/gpu_kit.sh [OUT_DIR] [PARTS]   # OUT_DIR (default: benchmarks/results/kit-<date>): the logs
#
# PARTS (default: all) picks what runs, so that a short lease takes it in calls of under 10 minutes each:
# kernels (kernel_candidates.py, KIT_BUDGET seconds, default 480), tests (doctor and the GPU tier but the
# trainer's, ~4 min), train (train.py on the GPU: tests/gpu/test_gpu_train.py, ~6 min), data (DALI's data
# path, when DALI is installed), or several, e.g. "tests data".
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
# Environment: GCVIT_COMMIT names the commit where .git is absent; KIT_BUDGET (seconds, default 480) bounds
# the kernel candidates' benchmark, which skips (and lists) what would not fit.
set -uo pipefail
case "${1:-}" in  # the header above is the usage
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_kit.sh: unknown option $1 (bash benchmarks/gpu_kit.sh --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/kit-$(date -u +%Y%m%d-%H%M)}
PARTS=${2:-all}
want() { [ "$PARTS" = all ] || [[ " $PARTS " == *" $1 "* ]]; }
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

tier() {  # tier NAME PYTEST-ARGS...: a part of tests/gpu, its log in OUT
    local name=$1; shift
    step "GPU test tier: $name"
    timeout 600 python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu-tests-$name.log" || status=1
}
if want tests; then
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
    # the kernels' correctness, the model, the sync-free steps, the data path
    tier main tests/gpu --ignore tests/gpu/test_gpu_train.py
fi
want train && tier train tests/gpu/test_gpu_train.py
if want kernels; then
    if [ "$cuda" = 1 ]; then
        # every attention x norm candidate and flex kernel option set (gated against the math form): eager at
        # batch 128 and 256, by blocks at 128 (the default also whole), against timm eager and compiled whole;
        # compile workers on the machine's cores fill the caches meanwhile; the table is printed last
        # (under KIT_BUDGET s, docs/gpu-kit.md gives the phases)
        json="$RESULTS/gpu-gcvit_tiny-bf16-kernel-candidates-$STAMP.json"
        step "kernel candidates of gcvit_tiny, bf16, budget ${KIT_BUDGET:-480} s -> $json"
        timeout 600 python3 benchmarks/kernel_candidates.py --budget "${KIT_BUDGET:-480}" --json-out "$json" \
            --work-dir /tmp/gcvit-kernel-candidates 2>&1 | tee "$OUT/kernel-candidates.txt" || status=1
        cp "$json" "$OUT/" 2>/dev/null
        cp -r /tmp/gcvit-kernel-candidates/logs "$OUT/kernel-candidates-logs" 2>/dev/null
    else
        step "kernel candidates: no CUDA device, skipped (CPU proof: python benchmarks/kernel_candidates.py --dry-run)"
    fi
fi
if want data; then
    if [ "$cuda" = 1 ] && python3 -c "import nvidia.dali" 2>/dev/null; then
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
        step "data benchmark: needs CUDA and DALI (carry it in .dali/), skipped"
    fi
fi
step "done (status $status)"
exit $status
