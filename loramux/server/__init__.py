"""The serving runtime: base model loading (NF4), model runner, engine, OpenAI-compatible API."""
