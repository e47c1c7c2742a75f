"""The base's own answers to general prompts, generated in one batch for replay beside a small data set."""

from __future__ import annotations

import torch

from loramux.adapters.train_data import tokenize_dataset
from loramux.adapters.train_replay import ANSWER_TOKENS, GENERAL_PROMPTS, replay_conversations
from loramux.core.train_spec import REPLAY_EXAMPLES, TrainingSpec


def test_replayed_answers_are_the_models_own_greedy_answers(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).train()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    conversations = replay_conversations(model, tokenizer, torch.device("cpu"), 3)
    assert model.training  # left as it was
    assert [c[0]["content"] for c in conversations] == list(GENERAL_PROMPTS[:3])
    for conversation in conversations:  # what the model answers alone, unpadded, is what the batch gave
        user, assistant = conversation
        assert assistant["role"] == "assistant" and assistant["weight"] == 1
        text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = model.eval().generate(input_ids=ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
        model.train()
        assert assistant["content"] == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True).strip()
    examples, dropped = tokenize_dataset(tokenizer, conversations, 256)
    assert dropped == 0 and len(examples) == len(conversations)  # rows the trainer can learn from


def test_replay_is_for_small_data_sets_unless_asked():
    spec = TrainingSpec(data=["d"], output_dir="o")
    assert [spec.replayed_examples(n) for n in (5, 20, 99, 100, 5000)] == [5, 20, REPLAY_EXAMPLES, 0, 0]
    assert TrainingSpec(data=["d"], output_dir="o", replay=False).replayed_examples(20) == 0
    assert TrainingSpec(data=["d"], output_dir="o", replay=True).replayed_examples(5000) == REPLAY_EXAMPLES
    assert "20 of the base's own answers replayed (auto)" in spec.describe_auto(20)
