"""`loramux serve --hub URL`: adapters come from a remote hub, pulled once per revision and checked by sha256."""

from __future__ import annotations

import openai
import pytest
from huggingface_hub import HfApi

from tests.server.api.serving import launch

GREEDY = {"temperature": 0, "max_tokens": 8}
HELLO = [{"role": "user", "content": "hello"}]


def test_serve_takes_adapters_from_a_remote_hub(hub, make_adapter, checkpoint_dir, tmp_path):
    api = HfApi(endpoint=hub.url)
    api.create_repo("team/helper")
    first = api.upload_folder(folder_path=str(make_adapter(r=4)), repo_id="team/helper").oid

    server = launch(
        tmp_path / "home",
        "--base", str(checkpoint_dir), "--hub", hub.url, "--data-dir", str(tmp_path / "serve-data"),
        env={"HF_HUB_OFFLINE": "0"},
    )  # fmt: skip
    try:
        llm = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def answer(model: str) -> str:
            return llm.chat.completions.create(model=model, messages=HELLO, **GREEDY).choices[0].message.content

        base = answer(checkpoint_dir.name)
        adapted = answer("team/helper")
        assert adapted != base
        assert answer(f"team/helper@{first}") == adapted
        # pulled once: the revision sits in the cache under LORAMUX_HOME
        assert list((tmp_path / "home" / "cache" / "hub").rglob(f"{first}/adapter_model.safetensors"))

        second = api.upload_folder(folder_path=str(make_adapter(r=8)), repo_id="team/helper").oid
        newer = answer("team/helper")
        assert newer == answer(f"team/helper@{second}") != adapted  # the newest revision replaces the old one

        with pytest.raises(openai.NotFoundError):
            answer("team/missing")
    finally:
        server.stop()
