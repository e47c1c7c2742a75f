"""Where the engine and the merge command get adapters from: the seam between serving and the registry.

An adapter is named `ns/name` (newest revision of `main`) or `ns/name@REV`; a source resolves the name for a
tenant to an immutable revision and a local directory holding `adapter_config.json` and
`adapter_model.safetensors`. A name the tenant may not read resolves exactly like a missing one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_REF = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@(?P<rev>[\w.-]{1,128}))?"
)


class AdapterNotFoundError(LookupError):
    """No such adapter, or one the caller may not read (the two are never told apart)."""


@dataclass(frozen=True)
class AdapterRef:
    repo: str  # "ns/name"
    revision: str | None = None  # a commit id or branch; None = newest on main

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        match = _REF.fullmatch(text or "")
        if match is None or ".." in text:
            raise ValueError(f"{text!r} is not an adapter name: expected ns/name or ns/name@revision")
        return cls(repo=match.group("repo"), revision=match.group("rev"))

    def __str__(self) -> str:
        return self.repo if self.revision is None else f"{self.repo}@{self.revision}"


@dataclass(frozen=True)
class ResolvedAdapter:
    repo: str
    commit: str  # the immutable revision id; a new revision of the same repo has a new commit
    path: Path  # local directory with adapter_config.json and adapter_model.safetensors

    @property
    def key(self) -> str:
        """Identifies this exact revision, e.g. for caches."""
        return f"{self.repo}@{self.commit}"


class AdapterSource(Protocol):
    def resolve(self, ref: AdapterRef, tenant: str | None) -> ResolvedAdapter:
        """Resolve `ref` for `tenant` (None: single-user mode); raises AdapterNotFoundError."""
        ...
