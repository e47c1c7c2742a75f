"""loramux: many LoRA fine-tunes of one NF4 base model, served from one GPU."""

import logging

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, bitsandbytes warns when it is imported that it could not fetch an optional CPU kernel
# from the Hugging Face Hub (through the `kernels` package). loramux downloads nothing at run time and its CPU path
# multiplies with the dequantized weight, not that kernel: the warning would only be noise in every process that
# loads torch, including the ones loramux starts itself. `--log-level DEBUG` shows it again.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)
