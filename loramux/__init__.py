"""loramux: many LoRA fine-tunes of one NF4 base model, served from one GPU.

The packages are layers, each importing only from the layers below it (tests/test_layers.py checks it):

1. `loramux.core`: files and paths, model and adapter configs, adapter validation, training data and spec; no torch.
2. `loramux.registry`: tenants, keys, repos, blobs, the hub routes, fine-tuning jobs; no torch.
3. `loramux.server`: the model, layers and kernels, adapter weights, the engine and the OpenAI API.
4. `loramux.adapters`: the tools built on them (merge, training, the training worker); `loramux.cluster`, replicas
   on Ray Serve; `loramux.cli`, the commands.

This module itself (the version, logging) sits below them all.
"""

import logging

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, bitsandbytes warns when it is imported that it could not fetch an optional CPU kernel
# from the Hugging Face Hub (through the `kernels` package). loramux downloads nothing at run time and its CPU path
# multiplies with the dequantized weight, not that kernel: the warning would only be noise in every process that
# loads torch, including the ones loramux starts itself. `--log-level DEBUG` shows it again.
# The `kernels` package, which bitsandbytes asks for that kernel, warns in turn that it skips its publisher check when
# it cannot reach the Hub: the same noise, one level down.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_LOGGER = "kernels"
for _noisy in (BNB_CPU_LOGGER, KERNELS_LOGGER):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
