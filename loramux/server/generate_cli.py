"""`loramux generate`: load the base (NF4, or a merged checkpoint in bf16) and answer one prompt from the command
line."""

from __future__ import annotations

import argparse

from loramux.server.serve_cli import add_quantize_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user's message (rendered with the base's chat template)")
    parser.add_argument(
        "--base", default=None, help="base model: a Hugging Face directory or hub id (default: SmolLM2-135M-Instruct)"
    )
    add_quantize_argument(parser)
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from loramux.server.engine.engine import EngineConfig, LLMEngine
    from loramux.server.engine.request import SamplingParams
    from loramux.server.models.loader import load_base

    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    base = load_base(args.base, device=args.device, quantize=args.quantize)
    if args.raw:
        ids = base.tokenizer(args.prompt)["input_ids"]
    else:
        ids = base.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    engine = LLMEngine(base, config=EngineConfig(num_slots=0, max_num_seqs=1))
    try:
        (out,) = engine.generate([ids], SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    finally:
        engine.shutdown()
    print(out.text)
    return 0
