"""The model shapes the benchmarks write random checkpoints of (Hugging Face `config.json` fields)."""

LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}


def with_rope_parameters(shape: dict) -> dict:
    """`shape` with its `rope_theta` in the `rope_parameters` form that transformers' configs take now."""
    fields = {k: v for k, v in shape.items() if k != "rope_theta"}
    return {**fields, "rope_parameters": {"rope_type": "default", "rope_theta": shape["rope_theta"]}}
