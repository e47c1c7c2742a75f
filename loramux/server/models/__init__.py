"""Base models: resolving and converting checkpoints, the model configuration, the decoder."""
