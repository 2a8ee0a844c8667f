"""Loader: shards -> decoded, augmented, masked uint8 clip batches, exactly once per epoch and resumable."""
