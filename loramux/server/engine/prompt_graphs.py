"""Passes with prompt chunks (and the decode tokens beside them) through CUDA graphs captured piece by piece, the
attention run eagerly between them.

A pass over prompt chunks was launched kernel by kernel: about 1,400 launches for the 8B shape, 58-69 ms of host
time for one prompt of 128 tokens on an H200, so a step of a few prompts was bound by the host (through the graphs:
21 ms, 5 ms of it host time). Its attention cannot be one graph for all steps
(its shapes follow the chunks: how many prompts, how long, how much context), but everything else depends only on
the number of tokens. So, as vLLM's piecewise graphs do, the pass is cut at each layer's attention: piece 0 embeds
the tokens and makes layer 0's queries (storing its keys and values), piece i finishes layer i - 1 from its
attention output (o_proj, residual, MLP) and makes layer i's queries, the last piece finishes the last layer and
applies the final norm. Each piece is captured once per padded token count (`PROMPT_GRAPH_TOKENS`) and adapter
use; the attention between pieces runs eagerly on the step's real chunks (a few launches a layer).

Padding tokens (to the captured count) are token 0 at position 0 with no adapter; their keys and values go to the
scratch cache block no sequence owns, and no real token attends to them (the attention only reads the real chunks'
rows), so the real rows compute what a plain eager pass computes: each of them goes through the same row-wise
kernels.

The pieces read and write static buffers (token ids, positions, cache indices, adapter slots; the residual stream;
the queries; the attention output) sized for the largest count. Without capture (`capture=False`, and on the CPU)
the same pieces run eagerly, so the padding and the cut are tested anywhere.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loramux.server.layers.attention import BatchContext
from loramux.server.layers.lora import plan_step
from loramux.server.models.llama import LlamaForCausalLM

# Token counts that passes are captured for; a pass is padded up to the next one, and one of more tokens than the
# largest captured runs eagerly. Finer where mixed steps fall (a decode batch of up to 256 beside a few prompts):
# padding costs what real tokens cost (~27 us a token for the 8B shape on an H200), so at most 63 padding tokens up to
# 1,024, 127 up to 4,096, 255 beyond.
PROMPT_GRAPH_TOKENS = (*range(64, 1024 + 1, 64), *range(1152, 4096 + 1, 128), *range(4352, 16384 + 1, 256))


@dataclass
class _Pieces:
    """One token count's pieces (graph replays, or the eager functions) and what they pass on to each other."""

    run: list[Callable[[], object]]
    state: dict[str, object] = field(default_factory=dict)  # piece 0's outputs the later pieces read


class PromptGraphs:
    """Piecewise graphs of passes over prompt chunks (see the module docstring), captured on first use of a token
    count or by `capture_all`."""

    def __init__(self, model: LlamaForCausalLM, scratch_index: int, max_tokens: int, capture: bool = True) -> None:
        self.model = model
        self.scratch_index = scratch_index  # the flat cache index padding tokens write their keys and values to
        self.sizes = tuple(s for s in PROMPT_GRAPH_TOKENS if s <= max_tokens)
        self.capture = capture
        config = model.config
        largest = self.sizes[-1] if self.sizes else 0
        device, dtype = model.lm_head_weight.device, model.dtype
        width = config.num_attention_heads * config.head_dim
        # rows: token ids, positions, flat cache index, adapter slot
        self.inputs = torch.zeros(4, largest, dtype=torch.long, device=device)
        self.residual = torch.zeros(largest, config.hidden_size, dtype=dtype, device=device)
        self.queries = torch.zeros(largest, width, dtype=dtype, device=device)
        self.attended = torch.zeros(largest, width, dtype=dtype, device=device)
        self.pieces: dict[tuple[int, bool], _Pieces] = {}
        self.pool = None

    def size_for(self, tokens: int) -> int | None:
        """The captured token count a pass of `tokens` is padded to, or None (too many: it runs eagerly)."""
        at = bisect.bisect_left(self.sizes, tokens)
        return self.sizes[at] if at < len(self.sizes) else None

    def pad(self, ids: list[int], positions: list[int], kv_index: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """A pass's inputs as the (4, size) host tensor `run` takes: token ids, positions, flat cache indices and
        adapter slots, padded to the captured count."""
        tokens = len(ids)
        size = self.size_for(tokens)
        if size is None:
            raise ValueError(f"{tokens} tokens are more than the largest captured count {self.sizes[-1:]}")
        inputs = torch.empty(4, size, dtype=torch.long)
        inputs[:, tokens:] = torch.tensor([0, 0, self.scratch_index, -1])[:, None]
        inputs[0, :tokens] = torch.tensor(ids)
        inputs[1, :tokens] = torch.tensor(positions)
        inputs[2, :tokens] = kv_index
        inputs[3, :tokens] = torch.tensor(slots)
        return inputs

    def run(self, inputs: torch.Tensor, lora: bool, ctx: BatchContext) -> torch.Tensor:
        """The pass over `inputs` ((4, size) on the device, from `pad`) with or without the adapters' LoRA; `ctx`
        describes the real chunks for the attention. Returns the final hidden states (size, hidden), a view of a
        buffer the next pass overwrites."""
        size = inputs.shape[1]
        key = (size, lora)
        if key not in self.pieces:
            self.pieces[key] = self._capture(size, lora)
        pieces = self.pieces[key]
        self.inputs[:, :size].copy_(inputs)
        layers = self.model.attention_layers()
        queries = self.queries[:size].view(size, -1, self.model.config.head_dim)
        for i, piece in enumerate(pieces.run):
            piece()
            if i < len(layers):
                self.attended[:size].copy_(layers[i].attend(queries, ctx))
        return self.residual[:size]

    def capture_all(self, lora_options: tuple[bool, ...]) -> None:
        """Capture every token count ahead of use, the largest first (the later, smaller ones reuse its memory)."""
        for lora in lora_options:
            for size in reversed(self.sizes):
                if (size, lora) not in self.pieces:
                    self.pieces[(size, lora)] = self._capture(size, lora)

    def _functions(self, size: int, lora: bool) -> _Pieces:
        """The pieces of a pass of `size` tokens as plain functions of the static buffers."""
        model, inputs = self.model, self.inputs[:, :size]
        residual, queries, attended = self.residual[:size], self.queries[:size], self.attended[:size]
        slots = inputs[3] if lora else None
        count = model.config.num_hidden_layers
        pieces = _Pieces(run=[])
        state = pieces.state

        def first() -> None:
            x = model.model.embed_tokens(inputs[0])
            state["cos"], state["sin"] = model.model.rotary(inputs[1], x.dtype)
            segments = plan_step(slots, model.num_lora_pages) if slots is not None else None
            state["ctx"] = BatchContext(
                kv_index=inputs[2], token_slots=slots, query_ranges=[], context_index=[], segments=segments
            )
            residual.copy_(x)
            queries.copy_(model.layer_queries(0, x, state["cos"], state["sin"], state["ctx"]).reshape(size, -1))

        def piece(i: int) -> None:  # finishes layer i - 1, begins layer i (or ends the pass)
            ctx = state["ctx"]
            assert isinstance(ctx, BatchContext)
            x = model.finish_layer(i - 1, residual, attended, ctx)
            if i < count:
                residual.copy_(x)
                queries.copy_(model.layer_queries(i, x, state["cos"], state["sin"], ctx).reshape(size, -1))
            else:
                residual.copy_(model.model.norm(x))

        pieces.run = [first, *(lambda i=i: piece(i) for i in range(1, count + 1))]
        return pieces

    def _capture(self, size: int, lora: bool) -> _Pieces:
        """The pieces for `size` tokens: captured on a GPU (after one eager run, which compiles and lets cuBLAS pick
        its kernels), as they are elsewhere. The inputs are padding while capturing, so the run writes only the
        scratch block."""
        inputs = self.inputs[:, :size]
        inputs[:2].zero_()
        inputs[2].fill_(self.scratch_index)
        inputs[3].fill_(-1)
        functions = self._functions(size, lora)
        if not self.capture or self.residual.device.type != "cuda":
            return functions
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for function in functions.run:
                function()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graphs = []
        for function in functions.run:  # in order: piece 0's outputs (functions.state) are the later pieces' inputs
            graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's calls are checked and captured; a capture on first use happens while
            # serving, with other threads of the process (the adapter fetch threads) at work
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                function()
            graphs.append(graph)
        return _Pieces(run=[graph.replay for graph in graphs], state=functions.state)
