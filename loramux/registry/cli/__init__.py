"""The command-line faces of the registry: `loramux hub|tenants|keys` and `adapters push|pull|ls|show|rm`."""
