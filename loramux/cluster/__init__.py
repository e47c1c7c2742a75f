"""loramux on Ray Serve: N replicas (an engine process and the OpenAI-compatible app each, one GPU each) behind Ray
Serve's HTTP proxy and an ingress that routes each request by its adapter with Ray Serve's model multiplexing.
`loramux cluster serve` starts it; `loramux.cluster.app:build` is the application for a Ray Serve config file."""
