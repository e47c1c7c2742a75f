"""The tools that make adapters, on top of the engine and the registry: merge, QLoRA training, the training worker
and the `adapters` command."""
