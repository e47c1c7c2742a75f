"""Base models: resolving and converting checkpoints, the decoder, and adapters' LoRA weights read against it (the
model configuration is `loramux.core.model_config`)."""
