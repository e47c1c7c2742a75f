"""The HTTP layer: OpenAI-compatible routes, errors in OpenAI's shape, Prometheus metrics, the app factory."""
