"""Preflight check of a node, its data and its cluster before a long run: one table of OK / WARN / FAIL rows.

    python -m gcvit.doctor data.root=/data/imagenet trainer.output_dir=/ckpt/run1 [--json doctor.json]
    torchrun --nproc_per_node=8 -m gcvit.doctor experiment=in1k_gcvit_tiny data.root=/data/imagenet
    srun --ntasks-per-node=8 python -m gcvit.doctor experiment=in1k_gcvit_tiny data.root=/data/imagenet

The arguments are train.py's Hydra overrides (conf/ is composed the same way). Every rank checks its own
node and reads its own sample of the dataset; all ranks time an all-reduce together; rank 0 prints the table.
Exit code: 0 no blocker (WARN rows allowed), 1 a FAIL row, 2 the overrides do not compose. See docs/doctor.md.

The package: cli.py (composing conf/, merging the ranks, the table, --json, the exit code), checks.py (the
checks of one node, each returning Rows), ranks.py (what every rank runs, and the all-reduce), projections.py
(rank 0's rows from the measured figures). A new row: a function in checks.py, called from ranks.node_rows
(per node) or cli.main (rank 0), its name in cli.ORDER. cluster.py knows the interconnects.
"""
