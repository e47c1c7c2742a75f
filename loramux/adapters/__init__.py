"""PEFT-format LoRA adapters: configuration, validation, weights, batched LoRA math, merge, training, the CLI."""
