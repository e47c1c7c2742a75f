"""The bottom layer, imported by every other and importing none of them, nor torch: where loramux keeps its files,
the base model's configuration and linear layers, the PEFT adapter format (config, safetensors checks), adapter
names and sources, chat training data and the training spec."""
