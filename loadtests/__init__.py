"""Load tests: an OpenAI-protocol load generator (`python -m loadtests.loadgen`) and its workload model."""
