"""The hub's Xet routes: the stock huggingface_hub client with hf_xet uploads through them, the formats they parse,
their tokens and the xorbs they keep."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import httpx
import lz4.block
import lz4.frame
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.utils._runtime import is_xet_available

from loramux.registry.registry import Registry
from loramux.registry.xet import (
    XetFormatError,
    XetTokens,
    XorbStore,
    chunk_bytes,
    hash_name,
    shard_files,
    xorb_chunks,
)


def safetensors_file(path: Path, floats: int, seed: int = 0) -> Path:
    """A valid safetensors file of `floats` fp32 values (structured, so that hf_xet compresses its chunks)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.randn(floats // 2), "r": torch.arange(floats - floats // 2, dtype=torch.float32)}, str(path))
    return path


def test_the_stock_client_uploads_a_large_file_through_xet(hub, tmp_path):
    assert is_xet_available()  # hf_xet installed, nothing turned it off: what a user's client does
    model = safetensors_file(tmp_path / "model" / "model.safetensors", 600_000)  # 2.4 MB, over the 1 MiB LFS mark
    (tmp_path / "model" / "config.json").write_text("{}")
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/big")
    commit = api.upload_folder(folder_path=str(tmp_path / "model"), repo_id="me/big")

    info = api.model_info("me/big", files_metadata=True)
    assert info.sha == commit.oid
    weights = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    got = hf_hub_download("me/big", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == model.read_bytes()
    assert any((hub.data_dir / "xorbs" / "me").iterdir())  # it came as xorbs, kept for later pushes

    # A second revision that shares most chunks with the first: the client reuses the xorbs it already sent.
    import torch
    from safetensors.torch import load_file, save_file

    grown = tmp_path / "grown.safetensors"
    save_file({**load_file(str(model)), "extra": torch.ones(1000)}, str(grown))
    second = api.upload_file(path_or_fileobj=str(grown), path_in_repo="model.safetensors", repo_id="me/big")
    got = hf_hub_download("me/big", "model.safetensors", revision=second.oid, endpoint=hub.url, cache_dir=tmp_path)
    assert Path(got).read_bytes() == grown.read_bytes()


def test_a_new_data_directory_at_the_same_address_gets_every_xorb_again(hub, tmp_path):
    """The client skips xorbs its cache says the CAS holds; a store that lost them (a new data directory, collected
    xorbs) has another id in its CAS URL, so the client's cache does not apply to it."""
    model = safetensors_file(tmp_path / "m" / "model.safetensors", 400_000)
    api = HfApi(endpoint=hub.url)
    api.create_repo("me/a")
    api.upload_file(path_or_fileobj=str(model), path_in_repo="model.safetensors", repo_id="me/a")
    first_id = hub.registry.xorbs.store_id
    for xorb in (hub.data_dir / "xorbs" / "me").iterdir():
        xorb.unlink()
    hub.registry.xorbs._new_store_id()  # what collecting xorbs does
    assert hub.registry.xorbs.store_id != first_id

    api.create_repo("me/b")
    api.upload_file(path_or_fileobj=str(model), path_in_repo="model.safetensors", repo_id="me/b")
    got = hf_hub_download("me/b", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == model.read_bytes()


def test_xet_tokens_are_scoped_to_their_namespace_and_write_right(hub):
    registry: Registry = hub.registry
    registry.create_tenant("acme")
    registry.create_tenant("globex")
    _, acme = registry.create_key("acme")
    _, globex = registry.create_key("globex")
    HfApi(endpoint=hub.url, token=acme).create_repo("acme/x")

    route = f"{hub.url}/api/models/acme/x/xet-write-token/main"
    assert httpx.get(route, headers={"authorization": f"Bearer {globex}"}).status_code == 403
    assert httpx.get(route).status_code == 401
    answer = httpx.get(route, headers={"authorization": f"Bearer {acme}"})
    assert answer.status_code == 200
    body = answer.json()
    assert answer.headers["x-xet-cas-url"] == body["casUrl"] and body["casUrl"].startswith(f"{hub.url}/xet/")
    assert answer.headers["x-xet-access-token"] == body["accessToken"]

    xorb = _xorb([b"hello xet"])
    url = f"{body['casUrl']}/v1/xorbs/default/{'ab' * 32}"
    assert httpx.post(url, content=xorb).status_code == 401  # no CAS token
    assert httpx.post(url, content=xorb, headers={"authorization": f"Bearer {acme}"}).status_code == 401  # an API key
    stored = httpx.post(url, content=xorb, headers={"authorization": f"Bearer {body['accessToken']}"})
    assert stored.status_code == 200 and stored.json() == {"was_inserted": True}
    assert (hub.data_dir / "xorbs" / "acme" / ("ab" * 32)).read_bytes() == xorb

    read = httpx.get(f"{hub.url}/api/models/acme/x/xet-read-token/main").json()["accessToken"]  # a public repo
    refused = httpx.post(url, content=xorb, headers={"authorization": f"Bearer {read}"})
    assert refused.status_code == 403


def test_a_shard_naming_an_unknown_xorb_or_the_wrong_sha256_is_refused(hub):
    token, _ = XetTokens().issue("me", write=True)  # another process's secret: not this hub's
    cas = _cas(hub)
    assert httpx.post(f"{cas['casUrl']}/v1/shards", content=b"", headers={"authorization": f"Bearer {token}"}
                      ).status_code == 401  # fmt: skip
    auth = {"authorization": f"Bearer {cas['accessToken']}"}
    data = b"some file content " * 10
    missing = _shard([("cd" * 32, 0, 1, len(data))], hashlib.sha256(data).digest())
    answer = httpx.post(f"{cas['casUrl']}/v1/shards", content=missing, headers=auth)
    assert answer.status_code == 400 and "is not stored on this hub" in answer.json()["error"]

    assert httpx.post(f"{cas['casUrl']}/v1/xorbs/default/{'ef' * 32}", content=_xorb([data]), headers=auth).is_success
    wrong = _shard([("ef" * 32, 0, 1, len(data))], hashlib.sha256(b"other").digest())
    answer = httpx.post(f"{cas['casUrl']}/v1/shards", content=wrong, headers=auth)
    assert answer.status_code == 400 and "does not rebuild to its sha256" in answer.json()["error"]
    right = _shard([("ef" * 32, 0, 1, len(data))], hashlib.sha256(data).digest())
    assert httpx.post(f"{cas['casUrl']}/v1/shards", content=right, headers=auth).json() == {"result": 1}
    assert hub.registry.blobs.exists(hashlib.sha256(data).hexdigest())


def test_a_malformed_xorb_is_refused(hub):
    cas = _cas(hub)
    auth = {"authorization": f"Bearer {cas['accessToken']}"}
    truncated = _xorb([b"x" * 100])[:50]
    answer = httpx.post(f"{cas['casUrl']}/v1/xorbs/default/{'12' * 32}", content=truncated, headers=auth)
    assert answer.status_code == 400 and "malformed header" in answer.json()["error"]
    assert not (hub.data_dir / "xorbs" / "me" / ("12" * 32)).exists()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 4096, 4099])
def test_chunks_of_every_scheme_decode(size):
    raw = bytes((i * 7 + i // 3) % 251 for i in range(size)) or b"\x01"
    groups = [raw[k::4] for k in range(4)]  # byte grouping, as the protocol describes it: every 4th byte together
    chunks = [
        (0, raw),
        (1, lz4.frame.compress(raw)),
        (1, lz4.block.compress(raw, store_size=False)),
        (2, lz4.frame.compress(b"".join(groups))),
    ]
    data = b"".join(_chunk(payload, scheme, len(raw)) for scheme, payload in chunks) + b"XETBLOB\x01" + b"\0" * 40
    parsed = xorb_chunks(data)
    assert [c[2] for c in parsed] == [0, 1, 1, 2]  # the footer after the chunks is not a chunk
    assert all(chunk_bytes(data, c) == raw for c in parsed)


def test_hash_names_and_shard_parsing():
    raw = bytes(range(32))
    # the protocol's example: each 8-byte word reversed
    assert hash_name(raw) == "07060504030201000f0e0d0c0b0a09081716151413121110" + "1f1e1d1c1b1a1918"
    sha = hashlib.sha256(b"abc").digest()
    files = shard_files(_shard([("01" * 32, 2, 5, 300), ("02" * 32, 0, 1, 20)], sha))
    assert len(files) == 1 and files[0].sha256 == sha.hex() and files[0].size == 320
    assert [(t.xorb, t.start, t.end) for t in files[0].terms] == [("01" * 32, 2, 5), ("02" * 32, 0, 1)]
    with pytest.raises(XetFormatError, match="no sha256"):
        shard_files(_shard([("01" * 32, 0, 1, 3)], None))
    with pytest.raises(XetFormatError, match="version 2"):
        shard_files(b"\0" * 100)


def test_collecting_old_xorbs_gives_the_store_a_new_id(tmp_path):
    import os
    import time

    store = XorbStore(tmp_path)
    assert store.put("me", "aa" * 32, _xorb([b"data"]))
    assert not store.put("me", "aa" * 32, _xorb([b"data"]))  # the same bytes again: nothing new
    first = store.store_id
    assert store.collect(3600) == 0 and store.store_id == first
    old = time.time() - 7200
    os.utime(tmp_path / "me" / ("aa" * 32), (old, old))
    assert store.collect(3600) == 1 and store.store_id != first
    with pytest.raises(XetFormatError, match="not stored"):
        store.get("me", "aa" * 32)


# ---- building xorbs and shards by hand, from the protocol's description ----


def _chunk(payload: bytes, scheme: int, raw_size: int) -> bytes:
    return bytes([0]) + len(payload).to_bytes(3, "little") + bytes([scheme]) + raw_size.to_bytes(3, "little") + payload


def _xorb(pieces: list[bytes]) -> bytes:
    return b"".join(_chunk(p, 0, len(p)) for p in pieces)


def _raw_hash(name: str) -> bytes:
    """The inverse of `hash_name`."""
    return struct.pack("<4Q", *(int(name[i : i + 16], 16) for i in range(0, 64, 16)))


def _shard(terms: list[tuple[str, int, int, int]], sha256: bytes | None) -> bytes:
    header = b"HFRepoMetaData\0" + b"\0" * 17 + struct.pack("<QQ", 2, 0)
    flags = 1 << 30 if sha256 is not None else 0
    out = header + b"\x11" * 32 + struct.pack("<II8x", flags, len(terms))
    for xorb, start, end, size in terms:
        out += _raw_hash(xorb) + struct.pack("<IIII", 0, size, start, end)
    if sha256 is not None:
        out += _raw_hash(sha256.hex()) + b"\0" * 16
    return out + b"\xff" * 32 + b"\0" * 16 + b"\xff" * 32 + b"\0" * 16


def _cas(hub) -> dict:
    HfApi(endpoint=hub.url).create_repo("me/cas")
    return json.loads(httpx.get(f"{hub.url}/api/models/me/cas/xet-write-token/main").text)
