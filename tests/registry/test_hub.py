"""The hub over HTTP with the clients users use: huggingface_hub's HfApi and downloads, PEFT, httpx; the protocol's
tests on both deployments (SQLite + local blobs, PostgreSQL + S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from loramux.core.adapter_source import AdapterRef
from loramux.registry.source import HubSource
from tests.conftest import STORAGES


@pytest.mark.parametrize("hub", STORAGES, indirect=True)
def test_peft_push_and_download_with_huggingface_hub(hub, make_adapter, tmp_path):
    adapter = make_adapter()
    api = HfApi(endpoint=hub.url)
    url = api.create_repo("me/tiny")
    assert url.repo_id == "me/tiny"
    commit = api.upload_folder(folder_path=str(adapter), repo_id="me/tiny", commit_message="first")
    info = api.model_info("me/tiny")
    assert info.sha == commit.oid and len(info.sha) == 40
    expected = sorted(p.name for p in adapter.iterdir())
    assert sorted(s.rfilename for s in info.siblings) == expected
    assert sorted(api.list_repo_files("me/tiny")) == expected
    assert api.file_exists("me/tiny", "adapter_config.json")
    assert not api.file_exists("me/tiny", "nope.json")

    path = hf_hub_download("me/tiny", "adapter_model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    snapshot = snapshot_download("me/tiny", endpoint=hub.url, local_dir=tmp_path / "snap")
    assert sorted(p.name for p in os.scandir(snapshot) if p.is_file()) == expected

    second = api.upload_file(path_or_fileobj=b"# tiny\n", path_in_repo="README.md", repo_id="me/tiny")
    assert api.model_info("me/tiny").sha == second.oid != commit.oid
    old = api.model_info("me/tiny", revision=commit.oid)
    assert old.sha == commit.oid  # an old revision stays readable
    assert api.model_info("me/tiny", revision=commit.oid[:7]).sha == commit.oid  # so does a short commit id
    short = hf_hub_download("me/tiny", "adapter_config.json", revision=commit.oid[:9], endpoint=hub.url,
                            cache_dir=tmp_path / "c2")  # fmt: skip
    assert Path(short).read_bytes() == (adapter / "adapter_config.json").read_bytes()


@pytest.mark.parametrize("hub", STORAGES, indirect=True)
def test_large_files_go_through_lfs_and_ranges_work(hub, tmp_path):
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/merged")
    shard = tmp_path / "model" / "model.safetensors"
    shard.parent.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [512, 1024], "data_offsets": [0, 512 * 1024 * 4]}}).encode()
    body = bytes(range(256)) * (512 * 1024 * 4 // 256)
    shard.write_bytes(len(header).to_bytes(8, "little") + header + body)
    (tmp_path / "model" / "config.json").write_text("{}")
    api.upload_folder(folder_path=str(tmp_path / "model"), repo_id="me/merged")
    sibling = next(
        s for s in api.model_info("me/merged", files_metadata=True).siblings if s.rfilename.endswith("tensors")
    )
    assert sibling.lfs is not None and sibling.size == shard.stat().st_size

    url = f"{hub.url}/me/merged/resolve/main/model.safetensors"
    head = httpx.head(url)
    assert head.headers["x-repo-commit"] == api.model_info("me/merged").sha
    assert int(head.headers["content-length"]) == shard.stat().st_size
    part = httpx.get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == shard.read_bytes()[8:16]
    assert part.headers["content-range"] == f"bytes 8-15/{shard.stat().st_size}"
    tail = httpx.get(url, headers={"Range": "bytes=-4"})
    assert tail.content == shard.read_bytes()[-4:]
    assert httpx.get(url, headers={"Range": f"bytes={shard.stat().st_size + 5}-"}).status_code == 416


def test_a_corrupted_lfs_blob_is_repaired_by_pushing_the_file_again(hub, tmp_path):
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/shards")
    folder = tmp_path / "model"
    folder.mkdir()
    shard = folder / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [512, 1024], "data_offsets": [0, 512 * 1024 * 4]}}).encode()
    shard.write_bytes(len(header).to_bytes(8, "little") + header + bytes(range(256)) * (512 * 1024 * 4 // 256))
    api.upload_folder(folder_path=str(folder), repo_id="me/shards")
    sha = next(s.blob_id for s in api.model_info("me/shards", files_metadata=True).siblings)
    blob = hub.data_dir / "blobs" / sha[:2] / sha[2:]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    url = f"{hub.url}/me/shards/resolve/main/model.safetensors"
    assert httpx.get(url).status_code == 500

    # The LFS batch must ask for the bytes again instead of answering "already stored".
    api.upload_folder(folder_path=str(folder), repo_id="me/shards", commit_message="repair")
    repaired = httpx.get(url)
    assert repaired.status_code == 200 and repaired.content == shard.read_bytes()


@pytest.mark.parametrize("hub", STORAGES, indirect=True)
def test_404s_carry_the_error_code_the_client_reads(hub, make_adapter):
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/a")
    api.upload_folder(folder_path=str(make_adapter()), repo_id="me/a")
    cases = {
        f"{hub.url}/me/missing/resolve/main/adapter_config.json": "RepoNotFound",
        f"{hub.url}/me/a/resolve/{'0' * 40}/adapter_config.json": "RevisionNotFound",
        f"{hub.url}/me/a/resolve/main/missing.json": "EntryNotFound",
    }
    for url, code in cases.items():
        response = httpx.get(url)
        assert response.status_code == 404 and response.headers["x-error-code"] == code
        assert response.json()["error"]
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("me/missing")


@pytest.mark.parametrize("hub", STORAGES, indirect=True)
def test_invalid_adapter_push_is_refused_and_leaves_no_revision(hub, make_adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((make_adapter() / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    (bad / "adapter_model.safetensors").write_bytes((make_adapter() / "adapter_model.safetensors").read_bytes())
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/bad")
    with pytest.raises(HfHubHTTPError) as refused:
        api.upload_folder(folder_path=str(bad), repo_id="me/bad")
    assert refused.value.response.status_code == 422
    assert "do not match rank 2" in refused.value.server_message
    assert api.model_info("me/bad").sha is None
    assert hub.registry.store.list_revisions(hub.registry.repo("me/bad", hub.registry.caller(None))) == []


@pytest.mark.parametrize("hub", STORAGES, indirect=True)
def test_tenants_private_repos_and_write_permissions(hub, make_adapter):
    registry = hub.registry
    for name in ("acme", "globex"):
        registry.create_tenant(name)
    acme, globex = registry.create_key("acme")[1], registry.create_key("globex")[1]
    as_acme, as_globex, anonymous = (HfApi(endpoint=hub.url, token=t) for t in (acme, globex, False))

    as_acme.create_repo("acme/secret", private=True)
    as_acme.upload_folder(folder_path=str(make_adapter()), repo_id="acme/secret")
    assert as_acme.model_info("acme/secret").private
    for api in (as_globex, anonymous):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("acme/secret")
        assert not api.file_exists("acme/secret", "adapter_config.json")
    hidden = httpx.get(f"{hub.url}/api/models/acme/secret", headers={"Authorization": f"Bearer {globex}"})
    missing = httpx.get(f"{hub.url}/api/models/acme/nothing", headers={"Authorization": f"Bearer {globex}"})
    assert (hidden.status_code, hidden.headers["x-error-code"]) == (missing.status_code, "RepoNotFound")
    assert hidden.json()["error"].replace("secret", "X") == missing.json()["error"].replace("nothing", "X")

    with pytest.raises(HfHubHTTPError) as forbidden:
        as_globex.create_repo("acme/other")
    assert forbidden.value.response.status_code == 403
    message = "tenant 'globex' may not write to namespace 'acme'"  # both names quoted whole
    assert forbidden.value.response.json()["error"] == message
    assert forbidden.value.response.headers["x-error-message"] == message
    with pytest.raises(HfHubHTTPError) as unauthenticated:
        anonymous.create_repo("acme/other")
    assert unauthenticated.value.response.status_code == 401
    bad_token = httpx.get(f"{hub.url}/api/models/acme/secret", headers={"Authorization": "Bearer lmx_nope"})
    assert bad_token.status_code == 401
    assert [m.id for m in as_acme.list_models(author="acme")] == ["acme/secret"]
    assert list(as_globex.list_models(author="acme")) == []


def test_a_corrupted_blob_is_never_served(hub, make_adapter):
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/a")
    api.upload_folder(folder_path=str(make_adapter()), repo_id="me/a")
    registry = hub.registry
    revision = registry.revision(registry.repo("me/a", registry.caller(None)), None)
    entry = registry.file(revision, "adapter_model.safetensors")
    blob = hub.data_dir / "blobs" / entry.sha256[:2] / entry.sha256[2:]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    response = httpx.get(f"{hub.url}/me/a/resolve/main/adapter_model.safetensors")
    assert response.status_code == 500 and "corrupted" in response.json()["error"]
    assert bytes(data) not in response.content


def test_path_escapes_in_a_commit_are_refused(hub, make_adapter):
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/a")
    body = b"\n".join(
        json.dumps(line).encode()
        for line in [
            {"key": "header", "value": {"summary": "escape"}},
            {"key": "file", "value": {"path": "../../evil.txt", "content": "aGk=", "encoding": "base64"}},
        ]
    )
    response = httpx.post(f"{hub.url}/api/models/me/a/commit/main", content=body)
    assert response.status_code == 400 and "evil.txt" in response.json()["error"]
    assert httpx.post(f"{hub.url}/api/repos/create", json={"name": "..", "organization": "me"}).status_code == 400
    assert api.model_info("me/a").sha is None


def test_peft_loads_an_adapter_from_the_hub_and_hub_source_pulls_it(hub, make_adapter, checkpoint_dir, tmp_path):
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/tiny")
    commit = api.upload_folder(folder_path=str(make_adapter()), repo_id="me/tiny")
    resolved = HubSource(hub.url, cache_dir=tmp_path / "cache").resolve(AdapterRef.parse("me/tiny"), None)
    assert resolved.commit == commit.oid
    assert (resolved.path / "adapter_model.safetensors").read_bytes() == (
        make_adapter() / "adapter_model.safetensors"
    ).read_bytes()

    script = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(checkpoint_dir)!r})
local_base = AutoModelForCausalLM.from_pretrained({str(checkpoint_dir)!r})
local = PeftModel.from_pretrained(local_base, {str(make_adapter())!r})
remote = PeftModel.from_pretrained(base, "me/tiny")
ids = torch.tensor([[1, 2, 3, 4]])
assert torch.equal(remote(ids).logits, local(ids).logits)
print("same logits")
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same logits" in result.stdout
