"""The training engine of train.py: build a run from its config, train and evaluate it (see loop.py)."""
