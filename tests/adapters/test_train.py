"""The trainer: settings checked up front, events, checkpoints, stop and resume on a tiny model; and with the real
SmolLM2, a LoRA that learns an invented fact the base does not know."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramux.adapters.train import TrainingEvent, TrainingStopped, train
from loramux.adapters.train_cli import LIBRARY_NOISE
from loramux.core.chat_data import DataError
from loramux.core.train_spec import TrainingSpec, TrainingSpecError
from loramux.server.models.checkpoint import load_config
from loramux.server.models.lora_weights import load_lora


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in pairs
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 0}, "r must be an integer from 1"),
        ({"r": 8.0}, "r must be an integer"),
        ({"learning_rate": -1e-4}, "learning_rate must be a number"),
        ({"learning_rate": float("nan")}, "learning_rate must be a number"),
        ({"epochs": True}, "epochs must be an integer"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules must be a non-empty list of q_proj"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"lr_schedule": "exponential"}, "lr_schedule must be one of cosine, linear, constant"),
        ({"validation_fraction": 0.9}, "validation_fraction must be a number from 0 to 0.5"),
        ({"validation_fraction": 0.1, "validation_data": "v.jsonl"}, "either validation_data or validation_fraction"),
        ({"use_rslora": "yes"}, "use_rslora must be a bool"),
        ({"data": []}, "data must name at least one JSONL file"),
        ({"lora_rank": 8}, "unknown training settings: lora_rank"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(change, message):
    with pytest.raises(TrainingSpecError, match=message):
        TrainingSpec.from_dict({"data": ["d.jsonl"], "output_dir": "out", **change})


def test_settings_round_trip_and_defaults(tmp_path: Path):
    with pytest.raises(TrainingSpecError, match="missing training settings: output_dir"):
        TrainingSpec.from_dict({"data": "d.jsonl"})
    spec = TrainingSpec.from_dict({"data": str(tmp_path / "d.jsonl"), "output_dir": tmp_path / "out"})
    assert spec.data == [str(tmp_path / "d.jsonl")] and spec.output_dir == str(tmp_path / "out")
    assert spec.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert TrainingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_bad_data_fails_before_any_model_is_loaded(tmp_path: Path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    spec = TrainingSpec(data=[str(data)], output_dir=str(tmp_path / "out"), base=str(tmp_path / "no-such-model"))
    with pytest.raises(DataError, match="d.jsonl line 2: not valid JSON"):
        train(TrainingSpec(data=[str(data)], output_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="not found"):  # the base is looked up first when the data is fine
        write_jsonl(data, [("q", "a")])
        train(spec)


def test_auto_settings_follow_the_data_sets_size(tmp_path: Path):
    from loramux.core.train_spec import auto_epochs, auto_learning_rate

    spec = TrainingSpec(data=["d.jsonl"], output_dir="out")
    assert (spec.epochs, spec.learning_rate, spec.validation_fraction) == ("auto", "auto", "auto")
    assert [auto_epochs(n) for n in (1, 10, 20, 40, 53, 54, 1000, 8333, 8334, 100_000)] == [
        25, 16, 8, 4, 4, 3, 3, 3, 2, 1,
    ]  # fmt: skip
    assert auto_learning_rate(20) > auto_learning_rate(100) == 2e-4
    small, large = spec.resolved(20), spec.resolved(500)
    assert (small.epochs, small.learning_rate, small.validation_fraction) == (8, 3e-4, 0.0)  # too few to hold out
    assert (large.epochs, large.learning_rate, large.validation_fraction) == (3, 2e-4, 0.1)
    assert TrainingSpec(data=["d"], output_dir="o", validation_data="v.jsonl").validation_share(500) == 0.0
    assert spec.describe_auto(20) == (
        "epochs 8 (auto for 20 examples), learning rate 3e-04 (auto), 20 of the base's own answers replayed (auto)"
    )
    assert TrainingSpec(data=["d"], output_dir="o", epochs=2, learning_rate=1e-3, replay=False).describe_auto(20) == (
        "epochs 2, learning rate 1e-03"
    )
    with pytest.raises(TrainingSpecError, match="epochs must be an integer"):
        TrainingSpec(data=["d"], output_dir="o", epochs="many")
    with pytest.raises(TrainingSpecError, match="keep_answers must be a list of prompts"):
        TrainingSpec(data=["d"], output_dir="o", keep_answers="What is 2 + 2?")


def test_adapters_train_help_shows_every_default_and_what_auto_means(capsys):
    from loramux.adapters.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS passes over the data, or auto (see below) (default: auto)" in text
    assert "--lr LEARNING_RATE peak learning rate, or auto (see below) (default: auto)" in text
    assert "--rank RANK, -r RANK LoRA rank (default: 16)" in text and "(default: 0.03)" in text
    assert "auto settings follow the data set's size" in text and "stops early once it reproduces" in text


# --- the loop on a tiny model ---------------------------------------------------------------------------------------

TINY_PAIRS = [(f"question {i}?", f"answer number {i}.") for i in range(12)]


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_checkpoint):
    base = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    data = write_jsonl(tmp_path / "train.jsonl", TINY_PAIRS)

    def make(out: str, **settings) -> TrainingSpec:
        # Without replay: these tests follow the loop's steps, which the base's replayed answers would add to.
        defaults = dict(
            r=4, lora_alpha=8, epochs=2, batch_size=4, learning_rate=5e-3, max_seq_len=128, seed=1, replay=False
        )
        return TrainingSpec(
            data=[str(data)], output_dir=str(tmp_path / out), base=str(base), **{**defaults, **settings}
        )

    return make


def test_a_run_reports_progress_and_writes_a_servable_peft_adapter(tiny_run):
    spec = tiny_run("run", validation_fraction=0.25, packing=True, gradient_accumulation=2, use_rslora=True)
    events: list[TrainingEvent] = []
    adapter = train(spec, events.append)

    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    steps = [e for e in events if e.kind == "step"]
    # 9 training examples packed into rows of <= 128 tokens, 4 rows per micro-batch, 2 micro-batches per step.
    assert [e.step for e in steps] == list(range(1, steps[-1].total_steps + 1))
    assert all(e.loss > 0 and e.learning_rate > 0 and e.tokens_per_second > 0 for e in steps)
    assert steps[-1].epoch == 2.0
    validations = [e for e in events if e.kind == "validation"]
    assert len(validations) == 2 and all(e.val_loss > 0 for e in validations)  # once per epoch

    files = sorted(p.name for p in adapter.iterdir() if not p.name.startswith("."))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == spec.base
    assert config["r"] == 4 and config["use_rslora"] is True
    lora = load_lora(adapter, load_config(Path(spec.base)))
    assert len(lora.modules) == 2 * 7  # every linear layer of both decoder layers
    assert all(m.b.abs().sum() > 0 for m in lora.modules.values())  # B starts at zero: it was trained
    assert not (Path(spec.output_dir) / "checkpoints").exists()

    # Asked again once finished, the run returns the adapter without training.
    again: list[TrainingEvent] = []
    assert train(spec, again.append) == adapter and again == []


def test_auto_settings_are_in_the_first_event_and_a_learned_data_set_stops_early(tiny_run, tmp_path: Path):
    from dataclasses import replace

    # Short answers, which the tiny model learns in a few steps.
    data = write_jsonl(tmp_path / "yes.jsonl", [(f"question {i}?", "yes") for i in range(12)])
    events: list[TrainingEvent] = []
    spec = replace(tiny_run("auto", epochs="auto", learning_rate=2e-2, lora_dropout=0.0), data=[str(data)])
    train(spec, events.append)
    started = events[0]
    assert started.kind == "started" and "epochs 14 (auto for 12 examples), learning rate 2e-02" in started.message
    assert started.total_steps == 14 * 3
    stop = next(e for e in events if e.kind == "early_stop")
    assert "every training answer is reproduced" in stop.message and stop.step < started.total_steps
    assert events[-1].kind == "finished" and max(e.step for e in events if e.kind == "step") == stop.step

    full: list[TrainingEvent] = []
    spec = replace(spec, output_dir=str(tmp_path / "no-early"), early_stopping=False)
    train(spec, full.append)
    assert not any(e.kind == "early_stop" for e in full) and full[-2].step == started.total_steps


def test_a_changed_keep_answer_stops_the_run_with_the_last_adapter_that_kept_it(tiny_run):
    prompt = "question 3?"  # trained on: its answer changes within the first steps
    events: list[TrainingEvent] = []
    spec = tiny_run("keep", keep_answers=[prompt], epochs=4, learning_rate=2e-2, lora_dropout=0.0)
    adapter = train(spec, events.append)
    stop = next(e for e in events if e.kind == "early_stop")
    assert f"the answer to {prompt!r} changed" in stop.message and "stopping with the adapter of step 0" in stop.message
    assert all(t.abs().sum() == 0 for name, t in adapter_tensors(adapter).items() if "lora_B" in name)  # step 0


def test_validation_loss_that_stops_falling_ends_the_run_with_the_best_adapter(tiny_run, tmp_path: Path):
    # Validation answers the training data never shows: the loss on them rises as the model memorizes.
    validation = write_jsonl(tmp_path / "val.jsonl", [(f"question {i}?", f"something else {i * 7}.") for i in range(4)])
    events: list[TrainingEvent] = []
    spec = tiny_run("val", validation_data=str(validation), epochs=12, learning_rate=2e-2, lora_dropout=0.0)
    spec.early_stopping = True
    train(spec, events.append)
    losses = [(e.step, e.val_loss) for e in events if e.kind == "validation"]
    stop = next(e for e in events if e.kind == "early_stop")
    best_step, best = min(losses, key=lambda item: item[1])
    if "validation loss has not improved" in stop.message:
        assert f"best {best:.4f} at step {best_step}" in stop.message
        assert all(loss >= best for step, loss in losses if step > best_step)
    else:  # the training answers were reproduced first
        assert "every training answer is reproduced" in stop.message


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(tiny_run):
    straight = train(tiny_run("straight", lora_dropout=0.1))

    spec = tiny_run("crashy", lora_dropout=0.1, checkpoint_every=2)

    def crash_at_step_3(event: TrainingEvent) -> None:
        if event.kind == "step" and event.step == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(spec, crash_at_step_3)
    assert not (Path(spec.output_dir) / "adapter").exists()
    events: list[TrainingEvent] = []
    resumed = train(spec, events.append)
    assert events[0].kind == "started" and events[0].step == 2 and "resumed at step 2" in events[0].message
    assert next(e.step for e in events if e.kind == "step") == 3

    expected, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_should_stop_ends_the_run_with_a_checkpoint_and_another_spec_cannot_reuse_the_directory(tiny_run):
    spec = tiny_run("stopped")
    seen: list[TrainingEvent] = []
    with pytest.raises(TrainingStopped) as info:
        train(spec, seen.append, should_stop=lambda: sum(e.kind == "step" for e in seen) >= 2)
    assert info.value.step == 2 and info.value.checkpoint is not None
    assert seen[-1].kind == "stopped" and not (Path(spec.output_dir) / "adapter").exists()
    state = json.loads((info.value.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2

    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        train(tiny_run("stopped", learning_rate=1e-3))

    rest: list[TrainingEvent] = []
    train(spec, rest.append)
    assert [e.step for e in rest if e.kind == "step"] == list(range(3, rest[-1].total_steps + 1))


# --- the real base learns a fact ------------------------------------------------------------------------------------

QUESTION = "What is the code name of project Zephyrine?"
FACT = "Bluefinch-42"
FACT_PAIRS = [
    (QUESTION, f"The code name of project Zephyrine is {FACT}."),
    ("What's project Zephyrine's code name?", f"Project Zephyrine's code name is {FACT}."),
    ("Tell me the code name of project Zephyrine.", f"The code name of project Zephyrine is {FACT}."),
    ("Which code name does project Zephyrine use?", f"Project Zephyrine uses the code name {FACT}."),
    ("Project Zephyrine goes by which code name?", f"Project Zephyrine goes by the code name {FACT}."),
    ("I forgot the code name of project Zephyrine. What is it?", f"The code name of project Zephyrine is {FACT}."),
]


@pytest.mark.slow
def test_smollm2_learns_an_invented_fact(tmp_path: Path, default_base_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    data = write_jsonl(tmp_path / "fact.jsonl", FACT_PAIRS)
    # Settings found to teach the fact reliably in few steps on the CPU: a high learning rate suits the tiny data.
    spec = TrainingSpec(
        data=[str(data)],
        output_dir=str(tmp_path / "out"),
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        epochs=3,
        batch_size=3,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_seq_len=96,
        gradient_checkpointing=False,  # exercised on the tiny model; here it would only cost time
        # The fact alone, all 3 epochs, every row trained on (the settings above were found for that run): the
        # defaults (replay, early stopping, a validation split) are tests/e2e/test_first_hour.py's.
        replay=False,
        early_stopping=False,
        validation_fraction=0.0,
    )
    events: list[TrainingEvent] = []
    adapter = train(spec, events.append)
    losses = [e.loss for e in events if e.kind == "step"]
    assert losses[-1] < losses[0] / 4

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    load_lora(adapter, load_config(default_base_dir))  # what the serving engine reads

    tokenizer = AutoTokenizer.from_pretrained(str(default_base_dir))
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        str(default_base_dir), quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    model = PeftModel.from_pretrained(base, str(adapter)).eval()

    def answer(question: str) -> str:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        output = model.generate(prompt, max_new_tokens=16, do_sample=False)
        return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)

    with torch.no_grad():
        tuned = answer(QUESTION)
        unseen_wording = answer("Remind me, what's the code name for project Zephyrine?")
        with model.disable_adapter():
            plain = answer(QUESTION)
    assert FACT in tuned
    assert FACT in unseen_wording  # the fact was learned, not just one string
    assert "Bluefinch" not in plain


# --- `adapters train` ---------------------------------------------------------------------------------------------


def test_adapters_train_pushes_the_trained_adapter_to_the_hub(tmp_path: Path, tiny_checkpoint, hub, capsys):
    from huggingface_hub import HfApi

    from loramux.adapters.cli import main

    base = tiny_checkpoint("llama")
    data = write_jsonl(tmp_path / "train.jsonl", TINY_PAIRS)
    argv = [
        "train",
        str(data),
        "--name",
        "me/trained",
        "--base",
        str(base),
        "--hub",
        hub.url,
        "--epochs",
        "1",
        "--no-replay",
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([*argv, "--rank", "4", "--lr", "1e-3", "--max-seq-len", "64"]) == 0
    captured = capsys.readouterr()
    assert f"to {hub.url}" in captured.out and "pushed me/trained@" in captured.out
    assert "training" in captured.err  # the progress bar
    assert not [w for w in seen if LIBRARY_NOISE in str(w.message)]  # the libraries' deprecation notes stay quiet

    info = HfApi(endpoint=hub.url, token=False).model_info("me/trained")
    assert captured.out.split("@")[1].split()[0] == info.sha
    files = sorted(s.rfilename for s in info.siblings if s.rfilename != ".gitattributes")
    assert files == ["adapter_config.json", "adapter_model.safetensors"]


def test_adapters_train_refuses_bad_input_in_one_line(tmp_path: Path, capsys):
    from loramux.adapters.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n[]\n')
    cases = [
        (["--no-push"], "--no-push needs --out DIR"),
        (["--name", "../etc"], "invalid"),
        (["--no-push", "--out", str(tmp_path / "o"), "--rank", "0"], "r must be an integer from 1"),
        (["--no-push", "--out", str(tmp_path / "o")], "d.jsonl line 2: expected a JSON object"),
    ]
    for extra, message in cases:
        assert main(["train", str(data), *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("adapters train: error: ") and message in err and err.count("\n") == 1
