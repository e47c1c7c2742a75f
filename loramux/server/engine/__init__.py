"""The serving engine: requests, paged KV blocks, adapter slots, the scheduler, the model runner, the engine API."""
