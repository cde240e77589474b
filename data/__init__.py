"""gcvit_data: the input pipeline (readers, DALI and torch loaders) and its pack, prepare and verify tools."""
