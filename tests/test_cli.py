"""The `loramux` command as a user runs it: one line on error, a non-zero exit."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_answer(tiny_checkpoint):
    """The CLI's answer is transformers' greedy continuation on the same dequantized NF4 weights."""
    import torch
    import transformers

    from loramux.server.layers.nf4_linear import NF4Linear
    from loramux.server.models.loader import load_base

    path = tiny_checkpoint()
    result = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr

    base = load_base(str(path), device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for name, module in base.model.named_modules():
        if isinstance(module, NF4Linear):
            ref.get_submodule(name).weight.data.copy_(module.dequantize())
    ids = base.chat_prompt_ids([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=list(base.stop_token_ids())
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in base.stop_token_ids()]
    assert result.stdout == base.tokenizer.decode(new, skip_special_tokens=True) + "\n"


def test_generate_keeps_a_merged_checkpoint_unquantized(tiny_checkpoint):
    """A checkpoint `adapters merge` wrote answers as transformers does with its own weights, not re-quantized."""
    import json

    import torch
    import transformers

    from loramux.server.models.checkpoint import MERGE_MARKER
    from loramux.server.models.loader import load_base

    path = tiny_checkpoint()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, MERGE_MARKER: {"base": "tiny", "adapters": []}}))
    result = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr

    base = load_base(str(path), device="cpu", quantize="none")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = base.chat_prompt_ids([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=list(base.stop_token_ids())
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in base.stop_token_ids()]
    assert result.stdout == base.tokenizer.decode(new, skip_special_tokens=True) + "\n"
    nf4 = run_cli("generate", "hello", "--base", str(path), "--max-tokens", "8", "--quantize", "nf4")
    assert nf4.returncode == 0 and nf4.stdout != result.stdout  # NF4 rounding changes the tiny model's answer


def test_generate_answers_with_an_adapter(tiny_checkpoint, tmp_path):
    """`--adapter DIR`: the answer is transformers + PEFT's greedy one on the same dequantized NF4 base."""
    import peft
    import torch
    import transformers

    from loramux.server.layers.nf4_linear import NF4Linear
    from loramux.server.models.loader import load_base
    from tests.conftest import build_adapter

    path = tiny_checkpoint()
    adapter = build_adapter(path, tmp_path / "adapter", r=4, targets=("q_proj", "v_proj", "down_proj"))
    # 5 tokens: the 7th is a near-tie on this random model, where float rounding may pick either
    args = ("generate", "hello", "--base", str(path), "--max-tokens", "5", "--device", "cpu")
    result = run_cli(*args, "--adapter", str(adapter))
    assert result.returncode == 0, result.stderr

    base = load_base(str(path), device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for name, module in base.model.named_modules():
        if isinstance(module, NF4Linear):
            ref.get_submodule(name).weight.data.copy_(module.dequantize())
    model = peft.PeftModel.from_pretrained(ref, str(adapter)).eval()
    ids = base.chat_prompt_ids([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=list(base.stop_token_ids())
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in base.stop_token_ids()]
    assert result.stdout == base.tokenizer.decode(new, skip_special_tokens=True) + "\n"
    assert result.stdout != run_cli(*args).stdout  # the adapter changes the answer

    helped = run_cli("generate", "--help")
    assert "--adapter NS/NAME[@REV]|DIR" in helped.stdout and "and an adapter" in run_cli("--help").stdout
    missing = run_cli(*args, "--adapter", str(tmp_path / "nope"))
    assert (
        missing.returncode == 1 and missing.stderr.count("\n") == 1 and "neither an adapter directory" in missing.stderr
    )


# Where bitsandbytes finds AVX512-BF16, importing it logs a warning that it could not fetch a CPU kernel from the Hub,
# and the `kernels` package it asks one that it skips its publisher check offline. This import hook makes them log
# those warnings on any CPU, as they are logged there.
BNB_WARNING = """
import importlib.abc, logging, sys
NAME = "bitsandbytes.backends.cpu.ops"
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != NAME:
            return None
        spec = next(s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                    for s in [f.find_spec(name, path, target)] if s is not None)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check: offline")
            logging.getLogger(NAME).warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Finder())
"""


def test_commands_that_load_torch_print_no_bitsandbytes_kernel_warning(tiny_checkpoint, tmp_path):
    import os

    (tmp_path / "sitecustomize.py").write_text(BNB_WARNING)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def generate(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "loramux.cli", *extra, "generate", "hi", "--base", str(tiny_checkpoint())]
        return subprocess.run([*command, "--max-tokens", "2"], capture_output=True, text=True, timeout=300, env=env)

    quiet = generate()
    assert quiet.returncode == 0, quiet.stderr
    assert "gemm_4bit_forward" not in quiet.stderr and "publisher trust" not in quiet.stderr
    shown = generate("--log-level", "DEBUG")  # the hook does make bitsandbytes log it
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in shown.stderr
    assert "Skipping publisher trust check" in shown.stderr
    library = subprocess.run(  # any process that imports loramux: the trainer, the engine's own processes
        [sys.executable, "-c", "import loramux.adapters.train, bitsandbytes"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert library.returncode == 0, library.stderr
    assert "gemm_4bit_forward" not in library.stderr and "publisher trust" not in library.stderr, library.stderr


def test_missing_base_fails_with_one_line(tmp_path):
    result = run_cli("generate", "hello", "--base", str(tmp_path / "missing"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("loramux generate: error: base model")


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout


def test_serve_refuses_a_negative_number_of_adapter_readers(tmp_path):
    result = run_cli("serve", "--adapter-readers", "-1", "--data-dir", str(tmp_path / "data"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--adapter-readers must not be negative, got -1" in lines[0]


def test_serve_refuses_a_negative_default_max_tokens(tmp_path):
    result = run_cli("serve", "--default-max-tokens", "-5", "--data-dir", str(tmp_path / "data"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--default-max-tokens must not be negative, got -5" in lines[0]
