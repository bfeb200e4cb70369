"""The embedded default model (`default/`), its training data generator and training script."""
