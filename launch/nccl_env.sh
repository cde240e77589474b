# Sourced by launch/torchrun.sh and launch/slurm.sbatch: NCCL defaults that make a hang diagnosable, each
# exported only where the user has set neither it nor its older name (docs/cluster.md, "NCCL settings").
# The names are torch 2.9+'s; TORCH_FR_DUMP_TEMP_FILE is left to the trainer, which points it into RUN_DIR/hang/.

# NAME OLDER_NAME VALUE: export NAME=VALUE unless NAME or OLDER_NAME is set (even to the empty string).
nccl_default() {
    [[ -n ${!1+set} || -n ${!2+set} ]] || export "$1=$3"
}
# Flight recorder: every rank keeps its last 2000 collectives in memory (a few MB)...
nccl_default TORCH_FR_BUFFER_SIZE TORCH_NCCL_TRACE_BUFFER_SIZE 2000
# ...and writes them out when a collective times out (the trainer's watchdog dumps them earlier).
nccl_default TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_NCCL_DUMP_ON_TIMEOUT 1
# A failed or timed-out collective ends the process instead of hanging it; 3 skips the communicator
# cleanup that can block and would lose the flight-recorder dump (pytorch/pytorch#121055).
nccl_default TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_ASYNC_ERROR_HANDLING 3
