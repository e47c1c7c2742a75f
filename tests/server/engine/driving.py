"""Driving an `LLMEngine` step by step in tests (requests of token ids in, each request's outputs collected), and an
adapter source over a directory (importable, so that an engine process can unpickle it)."""

from __future__ import annotations

import functools
import hashlib
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from loramux.core.adapter_source import AdapterNotFoundError, AdapterRef, ResolvedAdapter
from loramux.server.engine.llm_engine import LLMEngine
from loramux.server.engine.request import EngineOutput, SamplingParams


class Driver:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.outputs: dict[str, list[EngineOutput]] = defaultdict(list)
        self.finished: list[str] = []  # request ids, in the order they ended

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        tenant: str | None = None,
    ) -> None:
        self.engine.add(request_id, prompt_ids, params, adapter, tenant)

    def step(self, on_forward_queued=None) -> list[EngineOutput]:
        """One step (waiting a little when there was nothing to do) -> its outputs."""
        outputs = self.engine.step(on_forward_queued)
        if outputs is None:
            self.engine.wait_for_work(0.05)
            return []
        for out in outputs:
            self.outputs[out.request_id].append(out)
            if out.finished:
                self.finished.append(out.request_id)
        return outputs

    def run(self, max_steps: int = 100_000) -> None:
        """Step until every request ended (bounded, so that a request left waiting fails the test)."""
        for _ in range(max_steps):
            if not self.engine.has_unfinished():
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps: {list(self.engine.requests)}")

    def tokens(self, request_id: str) -> list[int]:
        return [t for out in self.outputs[request_id] for t in out.token_ids]

    def logits(self, request_id: str) -> torch.Tensor:
        return torch.cat([out.logits for out in self.outputs[request_id] if out.logits is not None])

    def finish_reason(self, request_id: str) -> str | None:
        return self.outputs[request_id][-1].finish_reason if self.outputs[request_id] else None

    def error(self, request_id: str) -> BaseException | None:
        return next((out.error for out in self.outputs[request_id] if out.error is not None), None)


class DirSource:
    """Adapter revisions copied under a directory; `publish` adds a revision, the newest one serves by default."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.revisions: dict[str, list[str]] = {}
        self.owners: dict[str, str | None] = {}

    def publish(self, repo: str, adapter_dir: Path, tenant: str | None = None) -> str:
        digest = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update((adapter_dir / name).read_bytes())
        commit = digest.hexdigest()[:40]
        target = self.root / repo / commit
        if not target.exists():
            shutil.copytree(adapter_dir, target)
        self.revisions.setdefault(repo, []).append(commit)
        self.owners[repo] = tenant
        return commit

    def resolve(self, ref: AdapterRef, tenant: str | None) -> ResolvedAdapter:
        commits = self.revisions.get(ref.repo)
        if not commits or self.owners[ref.repo] not in (None, tenant):
            raise AdapterNotFoundError(f"adapter {ref} not found")
        commit = commits[-1] if ref.revision is None else ref.revision
        if commit not in commits:
            raise AdapterNotFoundError(f"adapter {ref} not found")
        return ResolvedAdapter(ref.repo, commit, self.root / ref.repo / commit)

    def factory(self):
        """A picklable callable that returns this source as it is now (for `CoreSpec.source`)."""
        return functools.partial(_same, self)


def _same(source):
    return source
