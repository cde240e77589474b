"""Train or evaluate GC ViT: `python train.py` runs the embedded CPU demo; `--help` lists every key.

    python train.py                                                   # the demo (CPU, < 3 min)
    python train.py debug=tiny                                        # seconds: a smoke test
    torchrun --nproc_per_node=8 train.py experiment=in1k_gcvit_tiny data.root=/data/imagenet
    python train.py mode=eval experiment=in1k_gcvit_tiny data.root=/data/imagenet checkpoint=ckpt.pth

The demo is only the default of a command line that names no model, data set or preset
(gcvit.config.with_demo_default); docs/training.md and docs/config.md have the rest.
"""
from __future__ import annotations

import sys


def main() -> None:
    """Validate the composed config, run the job, and point at what comes next; exits with the job's code.

    The trainer is imported here, not at the top: DALI's feeder workers are spawned processes, which
    re-import this file as their main module, and need none of it (~700 MB of torch, timm and Hydra each);
    the trainer after the config's validation, which needs neither torch nor timm, so a typo fails at once.
    """
    import hydra
    from omegaconf import DictConfig

    from gcvit import list_models
    from gcvit.config import from_hydra, register, with_demo_default

    register()

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def job(cfg: DictConfig) -> None:
        config = from_hydra(cfg, list_models)  # torch-free: a bad key or value fails before torch loads
        from gcvit.engine.distributed import BUG_EXIT_CODE
        from gcvit.engine.guard import NonFiniteError
        from gcvit.engine.loop import StepOutOfMemory, run
        from gcvit.models.checkpoint import CheckpointError

        try:
            code = run(config)
        except (NonFiniteError, CheckpointError, StepOutOfMemory) as e:
            # These carry a one-line diagnosis and what to do; a traceback would only bury it. A restart
            # would fail alike: the launchers must not requeue (docs/cluster.md, "Exit codes").
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(BUG_EXIT_CODE)
        if code == 0 and config.mode == "train" and config.name == "demo":
            print("\nThat was the embedded demo. The paper's ImageNet-1K recipe, on 8 GPUs:\n  torchrun "
                  "--nproc_per_node=8 train.py experiment=in1k_gcvit_tiny data.root=/data/imagenet\n"
                  "  (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG; on SLURM see docs/cluster.md)")
        if code:
            # Hydra drops the task's return value; 75 (preempted) must reach the launcher.
            sys.exit(code)

    sys.argv[1:] = with_demo_default(sys.argv[1:])
    job()


if __name__ == "__main__":
    main()
