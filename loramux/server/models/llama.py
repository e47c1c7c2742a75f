"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM) with every decoder linear layer in NF4 (or,
for a merged checkpoint, unquantized in the compute dtype).

Module names follow the Hugging Face checkpoints (`model.layers.3.self_attn.q_proj`), so PEFT adapters' module
names address the layers directly. The forward pass is flat and paged: a step's tokens from many sequences are one
(T,) batch, keys/values live in a paged cache (`layers/attention.py`), and every linear layer adds the LoRA of each
token's adapter slot (`layers/lora.py`); q/k/v and gate/up each share one LoRA group, so that on the GPU each
group's LoRA is one shrink and one expand. `engine/model_runner.py` builds the batch (and replays decode steps as
CUDA graphs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from loramux.server.layers.lora_kernels import Segments

from loramux.core.model_config import ATTENTION_MODULES, ModelConfig
from loramux.server.layers.attention import BatchContext, paged_attention, store_kv
from loramux.server.layers.lora import DenseLoraLinear, LoraGroup, LoraLinear, LoraSlots, SlotMemory, plan_step
from loramux.server.layers.norm import RMSNorm
from loramux.server.layers.rotary import RotaryEmbedding, apply_rotary
from loramux.server.layers.slots import SlotLayout

QUANTIZE_CHOICES = ("nf4", "none")  # how the decoder linear layers hold their weights


class MissingWeightError(ValueError):
    """The checkpoint lacks a tensor the configuration calls for."""


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, linear: Callable[[str, bool], LoraSlots], norm: Callable[[str], RMSNorm]):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = linear("q_proj", config.attention_bias)
        self.k_proj = linear("k_proj", config.attention_bias)
        self.v_proj = linear("v_proj", config.attention_bias)
        self.o_proj = linear("o_proj", False)
        self.qkv = LoraGroup([self.q_proj, self.k_proj, self.v_proj])  # not a module: the layers are registered above
        self.q_norm = norm("q_norm") if config.qk_norm else None
        self.k_norm = norm("k_norm") if config.qk_norm else None
        # (num_blocks, block_size, n_kv_heads, head_dim) each, set by `LlamaForCausalLM.allocate_kv_cache`
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    # No forward: `LlamaForCausalLM.layer_queries` and `finish_layer` call the halves around the attention, whose
    # output goes through `o_proj` with the rest of the layer.
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """The queries (T, n_heads, head_dim) of x (T, hidden), their keys and values stored in the cache."""
        t = x.shape[0]
        slots = ctx.token_slots
        q, k, v = self.qkv(x, slots, ctx.segments)
        q = q.view(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv_heads, self.head_dim)
        v = v.view(t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos[:, None], sin[:, None])  # (T, H, hd)
        k = apply_rotary(k, cos[:, None], sin[:, None])
        store_kv(self.k_cache, self.v_cache, k, v, ctx.kv_index)
        return q

    def attend(self, q: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """Queries (T, n_heads, head_dim) -> attention output (T, n_heads · head_dim), before `o_proj`."""
        return paged_attention(q, self.k_cache, self.v_cache, ctx, self.n_kv_heads).reshape(q.shape[0], -1)


class MLP(nn.Module):
    def __init__(self, linear: Callable[[str, bool], LoraSlots]):
        super().__init__()
        self.gate_proj = linear("gate_proj", False)
        self.up_proj = linear("up_proj", False)
        self.down_proj = linear("down_proj", False)
        self.gate_up = LoraGroup([self.gate_proj, self.up_proj])

    def forward(
        self, x: torch.Tensor, token_slots: torch.Tensor | None, segments: Segments | None = None
    ) -> torch.Tensor:
        gate, up = self.gate_up(x, token_slots, segments)
        return self.down_proj(F.silu(gate) * up, token_slots, segments)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        take: Callable[[str], torch.Tensor | None],
        prefix: str,
        dtype: torch.dtype,
        quantize: str = "nf4",
    ):
        super().__init__()
        layer_class = LoraLinear if quantize == "nf4" else DenseLoraLinear

        def linear(name: str, bias: bool) -> LoraSlots:
            group = "self_attn" if name in ATTENTION_MODULES else "mlp"
            weight = _required(take, f"{prefix}.{group}.{name}.weight")
            b = _required(take, f"{prefix}.{group}.{name}.bias") if bias else None
            return layer_class(weight, b, dtype)

        def norm(name: str) -> RMSNorm:
            return RMSNorm(_required(take, f"{prefix}.self_attn.{name}.weight").to(dtype), config.rms_norm_eps)

        self.self_attn = Attention(config, linear, norm)
        self.mlp = MLP(linear)
        self.input_layernorm = RMSNorm(
            _required(take, f"{prefix}.input_layernorm.weight").to(dtype), config.rms_norm_eps
        )
        self.post_attention_layernorm = RMSNorm(
            _required(take, f"{prefix}.post_attention_layernorm.weight").to(dtype), config.rms_norm_eps
        )


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, take: Callable[[str], torch.Tensor | None], dtype: torch.dtype, quantize: str
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(_required(take, "model.embed_tokens.weight").to(dtype))
        self.layers = nn.ModuleList(
            DecoderLayer(config, take, f"model.layers.{i}", dtype, quantize) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(_required(take, "model.norm.weight").to(dtype), config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class LlamaForCausalLM(nn.Module):
    """The decoder with its output head. `dtype` is the compute dtype: bf16 on a GPU, fp32 on the CPU. `quantize`:
    "nf4" (every decoder linear layer in NF4 with double quantization) or "none" (kept in the compute dtype)."""

    def __init__(
        self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, quantize: str = "nf4"
    ):
        super().__init__()
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}")
        self.config = config
        self.dtype = dtype
        self.quantize = quantize

        def take(name: str) -> torch.Tensor | None:
            # pop, so that each full-precision tensor is freed once its NF4 copy exists
            return state_dict.pop(name, None)

        self.model = LlamaModel(config, take, dtype, quantize)
        self.num_lora_pages = 0
        self.lora_slot_memory: SlotMemory | None = None  # set by `allocate_lora_slots`
        head = take("lm_head.weight")
        if head is None or config.tie_word_embeddings:
            self.lm_head_weight = self.model.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(head.to(dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """input_ids, positions: (T,) flat tokens of a step -> hidden states (T, hidden) after the final norm."""
        x = self.model.embed_tokens(input_ids)
        if ctx.token_slots is not None and ctx.segments is None:
            ctx = dataclasses.replace(ctx, segments=plan_step(ctx.token_slots, self.num_lora_pages))
        cos, sin = self.model.rotary(positions, x.dtype)  # (T, hd) each
        for i, layer in enumerate(self.model.layers):
            attended = layer.self_attn.attend(self.layer_queries(i, x, cos, sin, ctx), ctx)
            x = self.finish_layer(i, x, attended, ctx)
        return self.model.norm(x)

    # A layer in two halves around its attention (the forward above; `engine/prompt_graphs.py` captures the halves
    # as CUDA graphs and runs the attention between them eagerly).
    def layer_queries(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext
    ) -> torch.Tensor:
        """Layer i's queries (T, n_heads, head_dim) from the residual stream x (T, hidden); its keys and values go
        into the cache."""
        layer = self.model.layers[i]
        return layer.self_attn.project(layer.input_layernorm(x), cos, sin, ctx)

    def finish_layer(self, i: int, x: torch.Tensor, attended: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """The residual stream after layer i, from the one before it and the layer's attention output (T, n_heads ·
        head_dim)."""
        layer = self.model.layers[i]
        x = x + layer.self_attn.o_proj(attended, ctx.token_slots, ctx.segments)
        return x + layer.mlp(layer.post_attention_layernorm(x), ctx.token_slots, ctx.segments)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden) -> logits (N, vocab) in fp32."""
        return F.linear(hidden, self.lm_head_weight).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def lora_modules(self) -> dict[str, LoraSlots]:
        """Every decoder linear layer by its Hugging Face module name (`model.layers.0.self_attn.q_proj`)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LoraSlots)}

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of K and V for one block across all layers."""
        c = self.config
        return 2 * c.num_hidden_layers * block_size * c.kv_size * torch.finfo(self.dtype).bits // 8

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        device = self.lm_head_weight.device
        shape = (num_blocks, block_size, self.config.num_key_value_heads, self.config.head_dim)
        for attn in self.attention_layers():
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=device)

    def allocate_lora_slots(self, layout: SlotLayout) -> None:
        """Slot memory of `layout` in every decoder linear layer: `num_lora_pages` slot indices (pages) from here on.
        It is one `SlotMemory` (`lora_slot_memory`): a few tensors that every layer's modules hold views of."""
        first = self.model.layers[0]
        attn, mlp = first.self_attn, first.mlp

        def shape(name: str, module: LoraSlots) -> tuple[str, int, int]:
            return name, module.in_features, module.out_features

        sites = [
            [shape("q_proj", attn.q_proj), shape("k_proj", attn.k_proj), shape("v_proj", attn.v_proj)],
            [shape("o_proj", attn.o_proj)],
            [shape("gate_proj", mlp.gate_proj), shape("up_proj", mlp.up_proj)],
            [shape("down_proj", mlp.down_proj)],
        ]
        memory = SlotMemory(layout, len(self.model.layers), sites, attn.q_proj.device, attn.q_proj.compute_dtype)
        for i, layer in enumerate(self.model.layers):
            memory.allocate_group(layer.self_attn.qkv, ["q_proj", "k_proj", "v_proj"], i)
            layer.self_attn.o_proj.allocate_slots(layout, memory.views("o_proj", i))
            memory.allocate_group(layer.mlp.gate_up, ["gate_proj", "up_proj"], i)
            layer.mlp.down_proj.allocate_slots(layout, memory.views("down_proj", i))
        self.lora_slot_memory = memory
        self.num_lora_pages = layout.pages


def _required(take: Callable[[str], torch.Tensor | None], name: str) -> torch.Tensor:
    tensor = take(name)
    if tensor is None:
        raise MissingWeightError(f"the checkpoint has no tensor {name}")
    return tensor
