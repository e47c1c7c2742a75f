"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM) with every decoder linear layer in NF4.

Module names follow the Hugging Face checkpoints (`model.layers.3.self_attn.q_proj`), so PEFT adapters' module
names address the layers directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.layers.norm import RMSNorm
from loramux.server.layers.rotary import RotaryEmbedding, apply_rotary
from loramux.server.models.config import ModelConfig

# Per-layer KV cache of the simple (dense) path: k, v each (B, n_kv_heads, T, head_dim).
LayerCache = tuple[torch.Tensor, torch.Tensor]

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES


class MissingWeightError(ValueError):
    """The checkpoint lacks a tensor the configuration calls for."""


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, linear: Callable[[str, bool], NF4Linear], norm: Callable[[str], RMSNorm]):
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
        self.q_norm = norm("q_norm") if config.qk_norm else None
        self.k_norm = norm("k_norm") if config.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache | None
    ) -> tuple[torch.Tensor, LayerCache]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, T, H, hd) -> (B, H, T, hd)
        q = apply_rotary(q, cos[:, :, None], sin[:, :, None]).transpose(1, 2)
        k = apply_rotary(k, cos[:, :, None], sin[:, :, None]).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, linear: Callable[[str, bool], NF4Linear]):
        super().__init__()
        self.gate_proj = linear("gate_proj", False)
        self.up_proj = linear("up_proj", False)
        self.down_proj = linear("down_proj", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, take: Callable[[str], torch.Tensor | None], prefix: str, dtype: torch.dtype
    ):
        super().__init__()

        def linear(name: str, bias: bool) -> NF4Linear:
            group = "self_attn" if name in ATTENTION_MODULES else "mlp"
            weight = _required(take, f"{prefix}.{group}.{name}.weight")
            b = _required(take, f"{prefix}.{group}.{name}.bias") if bias else None
            return NF4Linear(weight, b, dtype)

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
    def __init__(self, config: ModelConfig, take: Callable[[str], torch.Tensor | None], dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(_required(take, "model.embed_tokens.weight").to(dtype))
        self.layers = nn.ModuleList(
            DecoderLayer(config, take, f"model.layers.{i}", dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(_required(take, "model.norm.weight").to(dtype), config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class LlamaForCausalLM(nn.Module):
    """The decoder with its output head. `dtype` is the compute dtype: bf16 on a GPU, fp32 on the CPU."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.dtype = dtype

        def take(name: str) -> torch.Tensor | None:
            # pop, so that each full-precision tensor is freed once its NF4 copy exists
            return state_dict.pop(name, None)

        self.model = LlamaModel(config, take, dtype)
        head = take("lm_head.weight")
        if head is None or config.tie_word_embeddings:
            self.lm_head_weight = self.model.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(head.to(dtype), requires_grad=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: list[LayerCache] | None = None
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        """input_ids, positions: (B, T) -> logits (B, T, vocab) in fp32, and the extended cache."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions, x.dtype)
        past = 0 if cache is None else cache[0][0].shape[2]
        mask = None
        if input_ids.shape[1] > 1:
            # key j is visible to query i when j <= past + i
            t = input_ids.shape[1]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
        new_cache: list[LayerCache] = []
        for i, layer in enumerate(self.model.layers):
            h, layer_cache = layer.self_attn(
                layer.input_layernorm(x), cos, sin, mask, None if cache is None else cache[i]
            )
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_cache.append(layer_cache)
        logits = F.linear(self.model.norm(x), self.lm_head_weight).float()
        return logits, new_cache

    @torch.inference_mode()
    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of one prompt, stopping at a token of `stop_ids` (not returned)."""
        device = self.lm_head_weight.device
        ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(len(prompt_ids), device=device)[None]
        cache = None
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits, cache = self(ids, positions, cache)
            token = int(logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            ids = torch.tensor([[token]], device=device)
            positions = positions[:, -1:] + 1
        return out


def _required(take: Callable[[str], torch.Tensor | None], name: str) -> torch.Tensor:
    tensor = take(name)
    if tensor is None:
        raise MissingWeightError(f"the checkpoint has no tensor {name}")
    return tensor
