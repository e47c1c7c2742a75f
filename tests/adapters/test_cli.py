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
    # As a user runs it: no HF_HUB_DISABLE_XET (hf_xet is installed), no token or hub from the test's environment.
    dropped = ("HF_TOKEN", "LORAMUX_TOKEN", "LORAMUX_HUB", "HF_HUB_DISABLE_XET")
    inherited = {k: v for k, v in os.environ.items() if k not in dropped}
    full_env = {**inherited, "HF_HUB_OFFLINE": "0", **(env or {})}
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

    newest = listed.stdout.split("\t")[2]  # the short id ls prints is what every revision argument takes
    assert len(newest) == 12 and revisions[0].startswith(newest)
    assert f"use it as: me/tiny@{newest}" in shown.stdout
    by_short_id = adapters("show", "me/tiny", "--revision", newest, env=env)
    assert by_short_id.returncode == 0 and "rank: 4" in by_short_id.stdout, by_short_id.stderr
    first = revisions[1].split()[0][:7]
    pulled = adapters("pull", "me/tiny", "--revision", first, "--to", str(tmp_path / "old"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads((tmp_path / "old" / "adapter_config.json").read_text())["r"] == 8
    assert not (tmp_path / "old" / ".cache").exists()  # only the adapter's files, no download bookkeeping
    assert (tmp_path / "old" / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()

    removed = adapters("rm", "me/tiny", env=env)
    assert removed.returncode == 0, removed.stderr
    gone = adapters("show", "me/tiny", env=env)
    assert gone.returncode == 1 and gone.stderr.startswith("adapters show: error:") and "404" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1
    assert list((hub.data_dir / "blobs").glob("??/*")) == []  # rm collected every blob


def test_a_large_adapter_pushes_and_pulls_with_no_hf_variable_set(hub, make_adapter, tmp_path):
    """As from a fresh shell: no HF_* variable at all (hf_xet installed). A file over 1 MiB travels by LFS."""
    adapter = make_adapter(r=128, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    weights = adapter / "adapter_model.safetensors"
    assert weights.stat().st_size > 1 << 20
    bare = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and not k.startswith("LORAMUX_")}
    bare["HOME"] = str(tmp_path / "home")  # a user's own caches, not the test session's
    command = [sys.executable, "-m", "loramux.adapters.cli"]
    pushed = subprocess.run([*command, "push", str(adapter), "me/big", "--hub", hub.url], env=bare,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    pulled = subprocess.run([*command, "pull", "me/big", "--to", str(tmp_path / "back"), "--hub", hub.url], env=bare,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == weights.read_bytes()
    assert [p.name for p in (hub.data_dir / "xorbs").rglob("*") if p.is_file()] == [".store-id"]  # LFS, not Xet


def test_a_failed_first_push_leaves_no_empty_repo(hub, make_adapter):
    from loramux.core.validate import AdapterValidationError

    def refuse(files):
        raise AdapterValidationError("this hub's base cannot load it")

    adapters("push", str(make_adapter()), "me/kept", "--hub", hub.url)
    hub.registry.adapter_checks.append(refuse)
    first = adapters("push", str(make_adapter()), "me/new", "--hub", hub.url)
    assert first.returncode == 1 and "this hub's base cannot load it" in first.stderr
    assert hub.registry.store.get_repo("me", "new") is None  # created for the push, removed with its failure
    again = adapters("push", str(make_adapter(r=8)), "me/kept", "--hub", hub.url)
    assert again.returncode == 1
    assert hub.registry.store.get_repo("me", "kept") is not None  # an existing repo stays, with its revision


def test_lfs_uploads_are_chosen_even_after_huggingface_hub_was_imported():
    """`adapters merge --push` imports huggingface_hub (through transformers) long before it pushes."""
    code = (
        "import os; os.environ.pop('HF_HUB_DISABLE_XET', None)\n"
        "import huggingface_hub\n"
        "from huggingface_hub.utils._runtime import is_xet_available\n"
        "assert is_xet_available()\n"
        "from loramux.registry.client import use_lfs_uploads\n"
        "use_lfs_uploads()\n"
        "assert not is_xet_available()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


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
