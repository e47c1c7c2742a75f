"""`loramux generate`: load the base (NF4, or a merged checkpoint in bf16), optionally with one adapter, and answer one
prompt from the command line (greedy)."""

from __future__ import annotations

import argparse

from loramux.registry.cli.common import add_hub_arguments
from loramux.server.serve_cli import add_quantize_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user's message (rendered with the base's chat template)")
    parser.add_argument(
        "--base", default=None, help="base model: a Hugging Face directory or hub id (default: SmolLM2-135M-Instruct)"
    )
    add_quantize_argument(parser)
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="NS/NAME[@REV]|DIR",
        help="answer with this LoRA adapter: a local PEFT adapter directory, or a name on the hub (--hub)",
    )
    add_hub_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
    from loramux.server.engine.request import SamplingParams
    from loramux.server.models.loader import load_base

    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    adapter = _adapter(args) if args.adapter else None
    base = load_base(args.base, device=args.device, quantize=args.quantize)
    if args.raw:
        ids = base.tokenizer(args.prompt)["input_ids"]
    else:
        ids = base.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    if adapter is None:
        engine = LLMEngine(base, config=EngineConfig(num_slots=0, max_num_seqs=1))
    else:
        config = EngineConfig(num_slots=1, max_lora_rank=_max_rank(adapter.path), max_num_seqs=1)
        engine = LLMEngine(base, _OneAdapter(adapter), config)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        (out,) = engine.generate([ids], params, [_ADAPTER_NAME if adapter else None])
    finally:
        engine.shutdown()
    print(out.text)
    return 0


_ADAPTER_NAME = "cli/adapter"  # how the engine is asked for the one adapter `_OneAdapter` holds


class _OneAdapter:
    """The engine's adapter source for the adapter named on the command line (checked against the base on load)."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter

    def resolve(self, ref, tenant):
        return self.adapter


def _adapter(args: argparse.Namespace):
    from loramux.registry.client import hub_token, hub_url
    from loramux.registry.source import resolve_adapter_argument

    return resolve_adapter_argument(args.adapter, hub_url(args.hub), hub_token(args.token))


def _max_rank(path) -> int:
    from loramux.core.adapter_config import CONFIG_FILE, AdapterConfig

    config = AdapterConfig.from_file(path / CONFIG_FILE)
    return max([config.r, *config.rank_pattern.values()])
