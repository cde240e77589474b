#!/usr/bin/env bash
# Launch train.py with torchrun on one node or many; everything that is not a launcher option is
# passed to train.py as Hydra overrides.
#
#   launch/torchrun.sh experiment=in1k_gcvit_tiny data.root=/data/imagenet         # all GPUs here
#   launch/torchrun.sh --nnodes 4 --rdzv-endpoint node0:29500 experiment=...        # on each node
#
# Options (environment fallbacks in brackets):
#   --nnodes N            nodes, or MIN:MAX for an elastic range [NNODES, 1]
#   --nproc-per-node G    workers per node [NPROC_PER_NODE, the number of visible GPUs, else 1]
#   --rdzv-endpoint H:P   c10d rendezvous host:port, required with several nodes [RDZV_ENDPOINT]
#   --rdzv-id ID          run id shared by all nodes of one job [RDZV_ID, gcvit]
#   --max-restarts R      restarts of the whole worker group after a worker fails [MAX_RESTARTS, 3]
#   -h, --help            this text
# Each restart resumes from the last checkpoint in the run directory. SIGTERM or SIGUSR1 to torchrun
# is forwarded to the workers, which checkpoint and exit; they get SHUTDOWN_TIMEOUT seconds [120]
# before torchrun kills them.
set -euo pipefail

# --help: the comment block above, the script's usage.
usage() { awk 'NR > 1 && /^#/ && !/^#SBATCH/ {sub(/^# ?/, ""); print; next} NR > 1 && !/^#/ {exit}' "$0"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${GCVIT_PYTHON:-python}
nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-}
endpoint=${RDZV_ENDPOINT:-}
rdzv_id=${RDZV_ID:-gcvit}
max_restarts=${MAX_RESTARTS:-3}

overrides=()
while (($#)); do
    case $1 in
        --nnodes) nnodes=$2; shift 2 ;;
        --nproc-per-node) nproc=$2; shift 2 ;;
        --rdzv-endpoint) endpoint=$2; shift 2 ;;
        --rdzv-id) rdzv_id=$2; shift 2 ;;
        --max-restarts) max_restarts=$2; shift 2 ;;
        --nnodes=*|--nproc-per-node=*|--rdzv-endpoint=*|--rdzv-id=*|--max-restarts=*)
            opt=${1%%=*}; set -- "$opt" "${1#*=}" "${@:2}" ;;
        -h|--help) usage; exit 0 ;;
        --) shift; overrides+=("$@"); break ;;
        --*) echo "torchrun.sh: unknown option $1 (launcher options: --nnodes --nproc-per-node" \
                  "--rdzv-endpoint --rdzv-id --max-restarts --help; Hydra overrides look like key=value)" >&2
             exit 2 ;;
        *) overrides+=("$1"); shift ;;
    esac
done

if [[ -z $nproc ]]; then
    nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi

if [[ $nnodes == 1 && -z $endpoint ]]; then
    # One node: a private rendezvous on a free port, so concurrent runs on one machine never collide.
    rdzv=(--standalone)
elif [[ -z $endpoint ]]; then
    echo "torchrun.sh: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT (a host all nodes reach)" >&2
    exit 2
else
    [[ $endpoint == *:* ]] || endpoint=$endpoint:29500
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$REPO/launch/nccl_env.sh"  # flight recorder and async error handling, unless set
# A fresh TCP store for every restart round: on the agent's shared store a restarted group reads the
# peer addresses of the round before and fails to connect ("connectFullMesh ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$nnodes" --nproc-per-node "$nproc" "${rdzv[@]}" \
    --max-restarts "$max_restarts" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
    "$REPO/train.py" "${overrides[@]}"
