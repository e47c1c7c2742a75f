"""Registry names and file paths, checked before they reach the store or the disk: names are never file paths."""

from __future__ import annotations

import re

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,199}")
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
SHORT_COMMIT_ID = re.compile(r"[0-9a-f]{7,39}")  # a commit id's first digits, as git abbreviates it
SHA256 = re.compile(r"[0-9a-f]{64}")
MAIN = "main"


class InvalidNameError(ValueError):
    """A repo name, namespace or file path that loramux refuses (escapes, odd characters, too long)."""


def check_part(part: str, what: str = "name") -> str:
    """A namespace, repo name or tenant name: letters, digits, `_.-`, starting with a letter or digit, no `..`."""
    if not isinstance(part, str) or not _PART.fullmatch(part) or ".." in part or part.endswith((".git", ".")):
        raise InvalidNameError(
            f"invalid {what} {part!r}: use 1-96 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return part


def split_repo_id(repo_id: str) -> tuple[str, str]:
    """`ns/name` -> (`ns`, `name`), both checked."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InvalidNameError(f"invalid repo name {repo_id!r}: expected namespace/name")
    namespace, name = repo_id.split("/")
    return check_part(namespace, "namespace"), check_part(name, "repo name")


def check_repo_id(repo_id: str) -> str:
    split_repo_id(repo_id)
    return repo_id


def check_file_path(path: str) -> str:
    """A file's path inside a repo: relative, `/`-separated, each part a plain file name (no `.`, `..`, `.git`)."""
    if not isinstance(path, str) or not path or len(path) > 1000 or path.startswith("/") or "\\" in path:
        raise InvalidNameError(f"invalid file path {path!r}: expected a relative path such as 'dir/file.json'")
    for part in path.split("/"):
        if part == ".gitattributes" and path == part:
            continue  # git's attributes file at the top: harmless, and some clients send it
        if not _FILE_PART.fullmatch(part) or part in (".", "..") or part.lower() == ".git":
            raise InvalidNameError(f"invalid file path {path!r}: {part!r} is not an allowed file or folder name")
    return path
