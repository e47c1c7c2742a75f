"""The key that signs the hub's upload URLs and Xet tokens, one for every process that serves the same registry."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_FILE = "hub.key"
SECRET_ENV = "LORAMUX_HUB_SECRET"


def hub_secret(secret_file: Path | None) -> bytes:
    """The key that signs the hub's upload URLs and Xet tokens. Every process that serves the same registry must hold
    the same one, since a client may be handed a URL by one and send the file to another (several API processes on
    one port; several hubs behind a load balancer): `$LORAMUX_HUB_SECRET` where set (the hosts of a shared
    registry), else a random key kept in the data directory's `hub.key` (made once, readable by its owner only), else
    (no data directory) one for this process."""
    given = os.environ.get(SECRET_ENV)
    if given:
        return given.encode()
    if secret_file is None:
        return secrets.token_bytes(32)
    try:
        return bytes.fromhex(secret_file.read_text().strip())
    except FileNotFoundError:
        pass
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = secret_file.with_name(f".{secret_file.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    try:
        os.link(tmp, secret_file)  # the first process to get here sets the key; the others read the same one
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(secret_file.read_text().strip())
