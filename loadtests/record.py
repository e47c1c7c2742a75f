"""Where a benchmark's JSON goes by default: a new dated file under `loadtests/results/`, so that every run is kept.

A run's file is `loadtests/results/YYYY-MM-DD-<bench>-<commit>.json` (the UTC date; the short commit of the checkout
the benchmark ran from, with `-dirty` when tracked files differ from it, `nocommit` outside a git checkout), with
`-2`, `-3`, ... added when a run of the same day and commit already wrote one. Commit the files of the runs whose
figures `BENCHMARKS.md` quotes.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import date, datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "loadtests" / "results"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return None


def commit(repo: Path = REPO) -> str | None:
    """The short commit `repo` has checked out, `-dirty` added when a tracked file differs from it; None when `repo`
    is not a git checkout (a copy of the tree without `.git`)."""
    head = _git(repo, "rev-parse", "--short=7", "HEAD")
    if head is None or head.returncode != 0:
        return None
    changed = _git(repo, "diff", "--quiet", "HEAD", "--")
    dirty = changed is not None and changed.returncode == 1
    return head.stdout.strip() + ("-dirty" if dirty else "")


def dated_json_path(bench: str, directory: Path = RESULTS, repo: Path = REPO, day: date | None = None) -> Path:
    """A path no earlier run has taken: `directory/YYYY-MM-DD-<bench>-<commit>[-N].json` (the directory is made)."""
    day = day or datetime.now(timezone.utc).date()
    stem = f"{day.isoformat()}-{bench}-{commit(repo) or 'nocommit'}"
    directory.mkdir(parents=True, exist_ok=True)
    path, n = directory / f"{stem}.json", 2
    while path.exists():
        path, n = directory / f"{stem}-{n}.json", n + 1
    return path


@contextlib.contextmanager
def workdir(kept: Path | None, prefix: str) -> Iterator[Path]:
    """`kept` (made if missing, left in place for the next run), or a temporary directory removed afterwards."""
    if kept is not None:
        kept.mkdir(parents=True, exist_ok=True)
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def run_header(script: str, argv: list[str], device: str, shape: str) -> dict:
    """What a run's JSON begins with: the command as typed, the UTC time, the commit, the device (and on CUDA the
    GPU's name), Python's version and the model's shape."""
    header = {
        "command": " ".join(["python", script, *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": device,
        "python": platform.python_version(),
        "shape": shape,
    }
    if device == "cuda":
        import torch

        header["gpu"] = torch.cuda.get_device_name()
    return header


def help_text(doc: str | None) -> str:
    """A script's docstring's first paragraph on one line: its --help description."""
    return " ".join((doc or "").split("\n\n")[0].split())
