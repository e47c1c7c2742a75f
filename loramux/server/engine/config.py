"""How the engine runs (`EngineConfig`): every setting's default and validation in one place, and the defaults that
depend on the device, decided when the engine starts (`fit_to_device`). Importing it does not import torch, so that
the command line can build one cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramux.server.layers.slots import SlotLayout

if TYPE_CHECKING:
    from loramux.server.models.loader import BaseModel

MiB = 1 << 20


@dataclass
class EngineConfig:
    """How the engine runs. The fields left None where None is allowed are fitted to the device when the engine
    starts (`fit_to_device`)."""

    # Slot memory: this many adapters of max_lora_rank resident at once, more of lower rank. None: 4 on the CPU; on a
    # GPU as many as a tenth of the memory the weights leave holds (at most 64).
    num_slots: int | None = None
    max_lora_rank: int = 64  # r_max of the slots; adapters of higher rank are refused
    # Rows of one page of slot memory (None: 8 where max_lora_rank is a multiple of 8; max_lora_rank: no paging, one
    # adapter per slot whatever its rank). An adapter of rank r holds the power of two of pages that covers r.
    slot_page_rank: int | None = None
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from free memory at start
    gpu_memory_fraction: float = 0.85  # of the free GPU memory, after weights and slots, given to the KV cache
    cpu_kv_cache_bytes: int = 256 * MiB  # KV cache size on the CPU
    max_num_seqs: int | None = None  # requests in one batch; None: 256 on a GPU, 32 on the CPU
    # Tokens in one step (the prefill chunk size); None: 8,192 on a GPU, 512 on the CPU.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # context length; None: the base's max_position_embeddings
    max_queue: int = 1024  # requests accepted beyond max_num_seqs before QueueFullError
    adapter_cache_bytes: int = 2048 * MiB  # CPU cache of adapter weights, allocated when the engine starts
    # Processes that read adapters into the CPU cache (`adapter_reader`; 0: fetch threads read them in this
    # process). None: 2 on a GPU, where a read beside the step loop would keep its kernel launches waiting for the
    # GIL; 0 on the CPU.
    adapter_reader_processes: int | None = None
    # The engine process sends a step's outputs during the next step, once its forward is queued on the device,
    # instead of before that step starts: the device computes while the host packs and sends, for one step more
    # before each output is seen. None: on a GPU only (on the CPU the step computes on the host: nothing to overlap).
    overlap_outputs: bool | None = None

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_lora_rank", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "num_slots" else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        if self.adapter_cache_bytes < 0:
            raise ValueError(f"adapter_cache_bytes must not be negative, got {self.adapter_cache_bytes}")
        if self.adapter_reader_processes is not None and self.adapter_reader_processes < 0:
            raise ValueError(f"adapter_reader_processes must not be negative, got {self.adapter_reader_processes}")
        if self.num_slots is not None:
            self.slot_layout  # noqa: B018 (raises for a page rank unfit)

    @property
    def slot_layout(self) -> SlotLayout:
        """The layout of slot memory (once `num_slots` is decided: `fit_to_device`)."""
        assert self.num_slots is not None, "num_slots is decided when the engine starts"
        return SlotLayout.of(self.num_slots, self.max_lora_rank, self.slot_page_rank)


# What a GPU of the H100 class serves an 8B-class model with (vLLM's defaults for its API server), and what a few CPU
# cores can step. Adapter reads: on a GPU two reader processes, as many as the fetch threads that read in the engine's
# process on the CPU.
GPU_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "adapter_reader_processes": 2}
CPU_DEFAULTS = {"max_num_seqs": 32, "max_num_batched_tokens": 512, "num_slots": 4, "adapter_reader_processes": 0}
SLOT_MEMORY_FRACTION = 0.1  # of the device memory the weights leave: the most that automatic slots take
MAX_AUTO_SLOTS = 64


def fit_to_device(config: EngineConfig, base: BaseModel) -> tuple[EngineConfig, list[str]]:
    """`config` with its automatic fields decided for `base` on its device, and a line on each choice."""
    on_gpu = base.device.type == "cuda"
    chosen: dict[str, int] = {}
    for name, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(config, name) is None:
            chosen[name] = value
    device = "GPU" if on_gpu else "CPU"
    flags = {"num_slots": "slots", "adapter_reader_processes": "adapter_readers"}  # as `loramux serve` names them
    notes = [
        f"{flags.get(name, name).replace('_', '-')} {value} (the {device}'s default)" for name, value in chosen.items()
    ]
    if config.num_slots is None and on_gpu:
        import torch

        free, _total = torch.cuda.mem_get_info(base.device)
        modules = base.model.lora_modules().values()
        itemsize = torch.finfo(base.model.dtype).bits // 8
        slot_bytes = sum(m.in_features + m.out_features for m in modules) * config.max_lora_rank * itemsize
        chosen["num_slots"] = max(1, min(MAX_AUTO_SLOTS, int(free * SLOT_MEMORY_FRACTION) // max(1, slot_bytes)))
        slots = chosen["num_slots"]
        notes.append(
            f"slots {slots} of rank {config.max_lora_rank} ({slots * slot_bytes / 2**30:.1f} GiB, at most a tenth of"
            f" the {free / 2**30:.1f} GiB the weights leave)"
        )
    return (dataclasses.replace(config, **chosen) if chosen else config), notes


def kv_blocks_for(base: BaseModel, config: EngineConfig) -> int:
    """KV cache blocks: `num_kv_blocks`, else as many as `gpu_memory_fraction` of the free GPU memory (what the
    weights and the slots leave) holds, or `cpu_kv_cache_bytes` on the CPU."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    block_bytes = base.model.kv_block_bytes(config.block_size)
    if base.device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(base.device)
        budget = int(free * config.gpu_memory_fraction)
    else:
        budget = config.cpu_kv_cache_bytes
    return max(1, budget // block_bytes)
