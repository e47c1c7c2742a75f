"""The serving runtime: base model loading (NF4), adapter weights, model runner, engine, OpenAI-compatible API."""
