"""`adapters merge`: folding LoRA adapters into the dequantized NF4 base and writing a bf16 checkpoint."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import re
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from loramux.adapters import merge, merge_cli, merge_drift
from loramux.adapters.merge import MergeError, WeightedAdapter, merge_adapters
from loramux.core.adapter_source import ResolvedAdapter
from loramux.server.layers.nf4_linear import NF4Linear
from loramux.server.models.lora_weights import AdapterMismatchError

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write one sentence about cats."]
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def nf4_reference(model_dir: Path) -> transformers.PreTrainedModel:
    """transformers' model of `model_dir` in fp32 with every decoder linear weight replaced by dequant(NF4(W)),
    computed with the server's quantizer: the base an adapter is trained against and served with."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.weight.data = NF4Linear(module.weight.data, None, torch.float32).dequantize()
    return model


def peft_adapter(model: torch.nn.Module, directory: Path, seed: int, std: float, **lora_settings) -> peft.PeftModel:
    """Wrap `model` in a PEFT LoRA with random (non-zero) B, save it to `directory`, return the PEFT model."""
    settings = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, **lora_settings}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**settings)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(str(directory))
    return peft_model


def local(path: Path, weight: float = 1.0, repo: str = "acme/support", commit: str = "c0ffee") -> WeightedAdapter:
    return WeightedAdapter(ResolvedAdapter(repo=repo, commit=commit, path=path), weight, requested="main")


def leftovers(parent: Path) -> list[str]:
    """Temporary merge directories left next to the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the real SmolLM2 --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(default_base_dir, tmp_path_factory):
    """An adapter trained-shape on SmolLM2 (rsLoRA, rank and alpha patterns), the PEFT model serving it unmerged on
    the dequantized NF4 base, and the checkpoint `merge_adapters` writes for it (with the NF4 drift measured)."""
    root = tmp_path_factory.mktemp("smol")
    reference = nf4_reference(default_base_dir)
    peft_model = peft_adapter(
        reference,
        root / "adapter",
        seed=0,
        std=0.03,
        use_rslora=True,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"o_proj": 32},
    )
    result = merge_adapters(str(default_base_dir), [local(root / "adapter")], root / "merged", device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_base_dir))
    return {"root": root, "peft": peft_model, "result": result, "tokenizer": tokenizer, "base_dir": default_base_dir}


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)


@torch.inference_mode()
def test_bf16_merge_answers_like_the_unmerged_adapter(smol):
    peft_model, tokenizer = smol["peft"], smol["tokenizer"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(smol["root"] / "merged"), dtype=torch.float32)
    prompts = [chat_ids(tokenizer, prompt) for prompt in PROMPTS]
    expected = [peft_model.generate(ids, max_new_tokens=10, do_sample=False).tolist() for ids in prompts]
    for prompt, ids, tokens in zip(PROMPTS, prompts, expected, strict=True):
        assert merged.generate(ids, max_new_tokens=10, do_sample=False).tolist() == tokens, prompt
    with peft_model.disable_adapter():
        base = peft_model.get_base_model()
        changed = any(
            base.generate(ids, max_new_tokens=10, do_sample=False).tolist() != tokens
            for ids, tokens in zip(prompts, expected, strict=True)
        )
    assert changed, "the adapter should change what the model says, or the test shows nothing"


@torch.inference_mode()
def test_bf16_merge_logits_within_bf16_rounding(smol):
    """The merged weights are `dequant(NF4(W)) + ΔW` rounded once to bf16 (8 significant bits): that rounding is the
    only difference from the unmerged model. The tolerance: the merged model's logits may differ from the unmerged
    ones by at most twice what rounding the NF4 base's own linear weights to bf16 moves the base's logits."""
    peft_model, tokenizer = smol["peft"], smol["tokenizer"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(smol["root"] / "merged"), dtype=torch.float32)
    prompts = [chat_ids(tokenizer, prompt) for prompt in PROMPTS]
    errors = [(merged(ids).logits - peft_model(ids).logits).abs().max().item() for ids in prompts]

    base_model = peft_model.get_base_model()
    # the decoder's linear layers (PEFT's wrappers hold them as `base_layer`), not the LoRA matrices
    linears = [
        m for n, m in base_model.named_modules() if type(m) is torch.nn.Linear and "layers." in n and "lora_" not in n
    ]
    assert len(linears) == 7 * base_model.config.num_hidden_layers
    with peft_model.disable_adapter():
        exact = [peft_model(ids).logits for ids in prompts]
        saved = [m.weight.data for m in linears]
        for m in linears:
            m.weight.data = m.weight.data.bfloat16().float()
        try:
            rounding = [(peft_model(ids).logits - e).abs().max().item() for ids, e in zip(prompts, exact, strict=True)]
        finally:
            for m, w in zip(linears, saved, strict=True):
                m.weight.data = w
    for prompt, error, bound in zip(PROMPTS, errors, rounding, strict=True):
        assert 0 < error <= 2 * bound, (prompt, error, bound)


def test_merged_checkpoint_is_complete_bf16(smol):
    out, base_dir = smol["root"] / "merged", smol["base_dir"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    base = load_file(str(base_dir / "model.safetensors"))
    assert set(tensors) == set(base)  # tied embeddings stay tied: no lm_head added
    # tensors the adapter does not touch are the base's own
    assert torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(tensors["model.layers.3.input_layernorm.weight"], base["model.layers.3.input_layernorm.weight"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and tokenizer.eos_token == smol["tokenizer"].eos_token
    assert (out / "generation_config.json").is_file()
    readme = (out / "README.md").read_text()
    assert "dequantized NF4" in readme
    assert "acme/support" in readme and "c0ffee" in readme and "main" in readme
    assert sha256(smol["root"] / "adapter" / "adapter_model.safetensors") in readme
    assert sha256(base_dir / "model.safetensors") in readme
    assert sha256(out / "model.safetensors") in readme
    assert leftovers(out.parent) == []


def test_requantized_drift_is_always_measured(smol):
    drift = smol["result"].drift
    assert drift is not None
    assert drift.kl_mean > 0
    assert 0 <= drift.top1_agreement <= 1
    assert drift.positions > 50 and drift.texts == len(merge_drift.DRIFT_TEXTS)
    assert f"{drift.kl_mean:.4g} nats" in (smol["root"] / "merged" / "README.md").read_text()


def test_merged_checkpoint_is_served_in_bf16_and_answers_like_its_adapter(smol, tmp_path):
    import openai

    from tests.server.api.serving import launch

    merged = smol["root"] / "merged"
    record = json.loads((merged / "config.json").read_text())[merge.MERGE_MARKER]
    assert record["adapters"] == [{"repo": "acme/support", "commit": "c0ffee", "weight": 1.0}]
    peft_model, tokenizer = smol["peft"], smol["tokenizer"]
    ids = chat_ids(tokenizer, PROMPTS[0])
    with torch.inference_mode():
        expected = peft_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]

    server = launch(tmp_path / "home", "--base", str(merged))
    try:
        assert "decoder weights in float32" in server.output()  # unquantized (fp32 compute on the CPU)
        llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        [model] = [m.id for m in llm.models.list().data]
        answer = llm.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        assert server.stop() == 0, server.output()


# ---- tiny checkpoints ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tiny_checkpoint, tmp_path):
    """A tiny base and two adapters for it with different ranks and targets."""
    base_dir = tiny_checkpoint()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_adapter(model, tmp_path / "one", seed=1, std=0.1, r=4, lora_alpha=8, rank_pattern={"down_proj": 2})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_adapter(
        model, tmp_path / "two", seed=2, std=0.1, r=2, lora_alpha=4, use_rslora=True, target_modules=["k_proj"]
    )
    return base_dir, tmp_path / "one", tmp_path / "two"


def test_weighted_sum_of_adapters(tiny, tmp_path):
    base_dir, one, two = tiny
    out = tmp_path / "out" / "merged"
    merge_adapters(str(base_dir), [local(one, 0.5), local(two, -1.0)], out, max_shard_bytes=40_000, device="cpu")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    merged = {k: v for shard in shards for k, v in load_file(str(out / shard)).items()}
    base = load_file(str(base_dir / "model.safetensors"))
    assert set(merged) == set(base) == set(index["weight_map"])
    ad1, ad2 = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))

    def delta(adapter, module, scaling):
        prefix = f"base_model.model.{module}"
        return scaling * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]

    def expected(module, *deltas):
        w = NF4Linear(base[f"{module}.weight"], None, torch.float32).dequantize()
        return (w + sum(deltas)).bfloat16()

    q, k, d, up = (
        f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj")
    )
    # adapter one: alpha/r = 8/4 on q, 8/2 on down (rank_pattern); adapter two: rsLoRA alpha/sqrt(r) = 4/sqrt(2) on k
    torch.testing.assert_close(merged[f"{q}.weight"], expected(q, 0.5 * delta(ad1, q, 2.0)), atol=0, rtol=0)
    torch.testing.assert_close(merged[f"{d}.weight"], expected(d, 0.5 * delta(ad1, d, 4.0)), atol=0, rtol=0)
    torch.testing.assert_close(merged[f"{k}.weight"], expected(k, -delta(ad2, k, 4 / 2**0.5)), atol=0, rtol=0)
    torch.testing.assert_close(merged[f"{up}.weight"], expected(up), atol=0, rtol=0)  # untargeted: still NF4 base
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"].bfloat16())

    # sharded output loads in transformers and in loramux
    from loramux.server.models.loader import load_base

    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16
    assert load_base(str(out), device="cpu").config.num_hidden_layers == 2


def test_adapter_that_does_not_fit_writes_nothing(tiny, tiny_checkpoint, tmp_path):
    _, one, _ = tiny
    other_base = tiny_checkpoint(hidden_size=96, intermediate_size=160)
    out = tmp_path / "out" / "merged"
    with pytest.raises(AdapterMismatchError, match="another base"):
        merge_adapters(str(other_base), [local(one)], out, device="cpu")
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_existing_output_needs_force(tiny, tmp_path):
    base_dir, one, _ = tiny
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists; pass --force"):
        merge_adapters(str(base_dir), [local(one)], out, device="cpu")
    assert (out / "keep.txt").read_text() == "mine"

    merge_adapters(str(base_dir), [local(one)], out, device="cpu", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_output_inside_an_input_is_refused(tiny):
    base_dir, one, _ = tiny
    with pytest.raises(MergeError, match="would replace an input"):
        merge_adapters(str(base_dir), [local(one)], base_dir, device="cpu", force=True)
    assert (base_dir / "model.safetensors").is_file()


def test_full_disk_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    base_dir, one, _ = tiny
    written = []

    def disk_full(tensors, path, metadata=None):
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(merge, "save_file", disk_full)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="no space left"):
        merge_adapters(str(base_dir), [local(one)], out, device="cpu")
    assert written and not out.exists() and leftovers(tmp_path) == []

    # replacing an existing checkpoint: the old one survives the failure untouched
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous")
    with pytest.raises(MergeError, match="no space left"):
        merge_adapters(str(base_dir), [local(one)], out, device="cpu", force=True)
    assert (out / "model.safetensors").read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


# ---- the command ---------------------------------------------------------------------------------------------------


def run_merge(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="adapters merge")
    merge_cli.add_arguments(parser)
    return merge_cli.run(parser.parse_args(list(argv)))


def test_command_merges_local_directories(tiny, tmp_path, capsys):
    base_dir, one, two = tiny
    out = tmp_path / "merged"
    code = run_merge(str(one), str(two), "--weights", "1,0.25", "--base", str(base_dir), "--out", str(out))
    assert code == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and f"loramux serve --base {out}" in printed.out
    drift = re.search(r"--quantize nf4\): mean KL ([\d.e-]+) nats, top-1 agreement ([\d.]+)%", printed.out)
    assert drift is not None and float(drift.group(1)) > 0  # always measured
    # The tiny random model with strong adapters: NF4 again changes its answers, and the command says so.
    assert float(drift.group(2)) < 99 and "warning: in NF4 the merge picks another next token" in printed.err
    readme = (out / "README.md").read_text()
    assert str(one.absolute()) in readme and "| 0.25 |" in readme


def test_command_rejects_bad_arguments(tiny, tmp_path):
    base_dir, one, _ = tiny
    out = str(tmp_path / "merged")
    with pytest.raises(ValueError, match="2 value"):
        run_merge(str(one), "--weights", "1,2", "--base", str(base_dir), "--out", out)
    with pytest.raises(ValueError, match="max-shard-size"):
        run_merge(str(one), "--max-shard-size", "lots", "--base", str(base_dir), "--out", out)
    with pytest.raises(ValueError, match="neither an adapter directory nor an adapter name"):
        run_merge(str(tmp_path / "no" / "such" / "dir"), "--base", str(base_dir), "--out", out)
    assert not Path(out).exists()


def test_help_says_the_base_is_dequantized_nf4(capsys):
    with pytest.raises(SystemExit):
        run_merge("--help")
    assert "dequantized NF4" in " ".join(capsys.readouterr().out.split())


def test_shard_sizes_parse():
    assert merge_cli.parse_size("5GB") == 5 * 10**9
    assert merge_cli.parse_size("500MB") == 500 * 10**6
    assert merge_cli.parse_size("2GiB") == 2 * 2**30
    assert merge_cli.parse_size("1234") == 1234


def test_merge_from_the_hub_and_push_the_result(hub, make_adapter, checkpoint_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from loramux.adapters.cli import main
    from loramux.registry.client import push

    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))  # where the pulled adapter is cached
    pushed = push(make_adapter(r=4), "me/tiny", hub.url, None, private=False, message="first")
    out = tmp_path / "merged"
    argv = ["merge", "me/tiny", "--hub", hub.url, "--base", str(checkpoint_dir), "--out", str(out), "--no-progress"]
    assert main([*argv, "--push", "me/tiny-merged"]) == 0, capsys.readouterr().err
    readme = (out / "README.md").read_text()
    assert f"| me/tiny | main | {pushed.commit} |" in readme

    info = HfApi(endpoint=hub.url).model_info("me/tiny-merged", files_metadata=True)
    files = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    pulled = HfApi(endpoint=hub.url).hf_hub_download("me/tiny-merged", "model.safetensors", local_dir=tmp_path / "dl")
    assert sha256(Path(pulled)) == sha256(out / "model.safetensors")

    capsys.readouterr()
    assert (
        main(["merge", "me/missing", "--hub", hub.url, "--base", str(checkpoint_dir), "--out", str(tmp_path / "x")])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adapters merge: error: adapter me/missing not found")
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
def test_gpu_merge_matches_cpu_and_holds_one_layer_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    shape = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8}
    base_dir = tiny_checkpoint(**shape)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_adapter(model, tmp_path / "adapter", seed=3, std=0.05)
    base = load_file(str(base_dir / "model.safetensors"))
    decoder = sum(t.numel() * 2 for name, t in base.items() if ".layers." in name)  # the decoder in bf16
    whole = sum(t.numel() * 2 for t in base.values())  # the whole model in bf16

    # The fold holds one layer's module at a time; the drift measure after it runs one whole model at a time (the
    # unmerged reference, then the merge), never two.
    peaks = {}
    real_drift = merge.measure_drift

    def measured_drift(*args, **kwargs):
        peaks["fold"] = torch.cuda.max_memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        try:
            return real_drift(*args, **kwargs)
        finally:
            peaks["drift"] = torch.cuda.max_memory_allocated() - before

    monkeypatch.setattr(merge, "measure_drift", measured_drift)
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # cuBLAS's workspace (32 MiB) is not the model's
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    merge_adapters(str(base_dir), [local(tmp_path / "adapter")], tmp_path / "gpu", device="cuda")
    assert peaks["fold"] < decoder / 2, (peaks, decoder)
    assert peaks["drift"] < 1.5 * whole, (peaks, whole)

    merge_adapters(str(base_dir), [local(tmp_path / "adapter")], tmp_path / "cpu", device="cpu")
    on_gpu, on_cpu = (
        load_file(str(tmp_path / "gpu" / "model.safetensors")),
        load_file(str(tmp_path / "cpu" / "model.safetensors")),
    )
    assert set(on_gpu) == set(on_cpu)
    # Both quantize to the same NF4 codes and constants, but bitsandbytes' CUDA and CPU dequantizers differ a little
    # in a few blocks (the nested absmax), so a small share of weights may be more than one bf16 step apart.
    for name, cpu in on_cpu.items():
        cpu, diff = cpu.float(), (on_gpu[name].float() - cpu.float()).abs()
        assert (diff > cpu.abs() * 2**-7 + 1e-6).float().mean() < 0.01, name
        assert diff.sum() <= 1e-4 * cpu.abs().sum(), name
