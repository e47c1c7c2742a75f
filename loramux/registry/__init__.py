"""The adapter registry and hub: tenants, API keys, repos and revisions, a content-addressed blob store, the Hugging
Face Hub-compatible HTTP routes and the push/pull client. Imports no torch, so a hub-only process starts fast."""
