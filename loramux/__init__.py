"""loramux: many LoRA fine-tunes of one NF4 base model, served from one GPU."""

__version__ = "0.1.0"
