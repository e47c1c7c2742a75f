"""The `adapters` command and `loramux hub|tenants|keys` as a user runs them, against the real hub."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest


def run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "LORAMUX_TOKEN", "LORAMUX_HUB")}
    full_env = {**inherited, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, env=full_env
    )


def adapters(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run("loramux.adapters.cli", *args, env=env)


def loramux(*args: str) -> subprocess.CompletedProcess:
    return run("loramux.cli", *args)


def test_push_ls_show_pull_rm(hub, make_adapter, tmp_path):
    adapter = make_adapter(r=8, targets=("q_proj", "v_proj", "o_proj"))
    env = {"LORAMUX_HUB": hub.url}
    pushed = adapters("push", str(adapter), "me/tiny", "--message", "first", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "rank 8" in pushed.stdout and "o_proj, q_proj, v_proj" in pushed.stdout
    again = adapters("push", str(make_adapter()), "me/tiny", "--hub", hub.url)
    assert again.returncode == 0, again.stderr

    listed = adapters("ls", env=env)
    assert listed.returncode == 0 and listed.stdout.startswith("me/tiny\tpublic\t")

    shown = adapters("show", "me/tiny", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "rank: 4" in shown.stdout and "alpha: 8" in shown.stdout  # the newest revision is the rank-4 one
    assert "target modules: q_proj, v_proj" in shown.stdout
    weights = make_adapter() / "adapter_model.safetensors"
    assert f"sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()}" in shown.stdout
    revisions = shown.stdout.split("revisions:\n")[1].strip().splitlines()
    assert len(revisions) == 2 and revisions[1].endswith("first")

    first = revisions[1].split()[0]
    pulled = adapters("pull", "me/tiny", "--revision", first, "--to", str(tmp_path / "old"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads((tmp_path / "old" / "adapter_config.json").read_text())["r"] == 8
    assert (tmp_path / "old" / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()

    removed = adapters("rm", "me/tiny", env=env)
    assert removed.returncode == 0, removed.stderr
    gone = adapters("show", "me/tiny", env=env)
    assert gone.returncode == 1 and gone.stderr.startswith("adapters show: error:") and "404" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1
    assert list((hub.data_dir / "blobs").glob("??/*")) == []  # rm collected every blob


def test_push_refuses_an_invalid_adapter_before_uploading(hub, make_adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((make_adapter() / "adapter_config.json").read_text())
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    result = adapters("push", str(bad), "me/bad", "--hub", hub.url)
    assert result.returncode == 1
    assert "adapter_model.bin is a pickle file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert hub.registry.store.get_repo("me", "bad") is None  # nothing was sent


def test_tenants_and_keys_commands_and_token_auth(hub, make_adapter):
    data = ["--data-dir", str(hub.data_dir)]
    assert loramux("tenants", "create", "acme", *data).returncode == 0
    created = loramux("keys", "create", "acme", *data)
    assert created.returncode == 0, created.stderr
    token, note = created.stdout.strip().splitlines()
    key_id = note.split()[1]
    assert hub.registry.authenticate(token) == "acme"
    listed = loramux("keys", "list", *data)
    assert key_id in listed.stdout and token not in listed.stdout

    env = {"LORAMUX_HUB": hub.url}
    anonymous = adapters("push", str(make_adapter()), "acme/a", env=env)
    assert anonymous.returncode == 1 and "401" in anonymous.stderr
    with_key = adapters("push", str(make_adapter()), "acme/a", "--private", env={**env, "LORAMUX_TOKEN": token})
    assert with_key.returncode == 0, with_key.stderr
    assert "acme/a" not in adapters("ls", env=env).stdout  # private: hidden from anonymous callers
    assert "acme/a\tprivate" in adapters("ls", "acme", env={**env, "HF_TOKEN": token}).stdout

    assert loramux("tenants", "create", "globex", *data).returncode == 0
    assert loramux("keys", "create", "globex", *data).returncode == 0  # keys still exist after the revoke below
    assert loramux("keys", "revoke", key_id, *data).returncode == 0
    revoked = adapters("ls", env={**env, "LORAMUX_TOKEN": token})
    assert revoked.returncode == 1 and "401" in revoked.stderr
    unknown = loramux("keys", "revoke", "nope", *data)
    assert unknown.returncode == 1 and unknown.stderr.startswith("loramux keys: error: no active key")


def test_hub_refuses_a_public_address_without_keys(tmp_path):
    result = loramux("hub", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "--allow-insecure-no-auth" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "code",
    [
        "import loramux.registry.hub, loramux.registry.source, loramux.registry.client",
        "from loramux.adapters.cli import build_parser; build_parser()",
        "from loramux.cli import build_parser; build_parser()",
    ],
)
def test_registry_and_hub_commands_import_no_torch(code):
    check = f"import sys; {code}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_unreachable_hub_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    result = adapters("ls", "--hub", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith("adapters ls: error: cannot reach the hub") and len(result.stderr.splitlines()) == 1
