"""A benchmark's default JSON path: dated, named for the bench and the commit, never one an earlier run took; its
working directory: the one asked for, kept, or a temporary one, removed."""

from __future__ import annotations

import re
import subprocess
from datetime import date
from pathlib import Path

from loadtests.record import REPO, RESULTS, commit, dated_json_path, run_header, workdir


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo), *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def make_repo(path: Path) -> str:
    path.mkdir()
    git(path, "init", "-q")
    (path / "bench.py").write_text("print(1)\n")
    git(path, "add", "bench.py")
    git(path, "commit", "-q", "-m", "first")
    return git(path, "rev-parse", "--short=7", "HEAD")


def test_each_run_gets_a_new_dated_file_named_for_the_bench_and_commit(tmp_path):
    head = make_repo(tmp_path / "repo")
    out = tmp_path / "results"  # made on first use
    first = dated_json_path("engine", directory=out, repo=tmp_path / "repo", day=date(2026, 12, 3))
    assert first == out / f"2026-12-03-engine-{head}.json" and out.is_dir()
    first.write_text("{}")
    second = dated_json_path("engine", directory=out, repo=tmp_path / "repo", day=date(2026, 12, 3))
    assert second == out / f"2026-12-03-engine-{head}-2.json"
    second.write_text("{}")
    assert dated_json_path("engine", out, tmp_path / "repo", date(2026, 12, 3)).name.endswith(f"{head}-3.json")
    assert first.read_text() == "{}"  # nothing overwritten


def test_a_changed_tracked_file_marks_the_commit_dirty(tmp_path):
    repo = tmp_path / "repo"
    head = make_repo(repo)
    (repo / "untracked.json").write_text("{}")  # results not yet committed do not count
    assert commit(repo) == head
    (repo / "bench.py").write_text("print(2)\n")
    assert commit(repo) == f"{head}-dirty"
    assert dated_json_path("nf4", tmp_path / "out", repo, date(2026, 1, 2)).name == f"2026-01-02-nf4-{head}-dirty.json"


def test_outside_a_git_checkout_the_name_says_so(tmp_path):
    (tmp_path / "tree").mkdir()
    assert commit(tmp_path / "tree") is None
    path = dated_json_path("train", tmp_path / "out", tmp_path / "tree", date(2026, 12, 3))
    assert path.name == "2026-12-03-train-nocommit.json"


def test_by_default_files_go_under_loadtests_results_of_this_checkout():
    assert RESULTS == REPO / "loadtests" / "results"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert re.fullmatch(rf"{head.stdout.strip()}(-dirty)?", commit() or "")
    else:  # a copy of the tree without its git history
        assert commit() is None


def test_a_workdir_asked_for_is_made_and_kept_a_temporary_one_removed(tmp_path):
    with workdir(tmp_path / "runs" / "a", "bench-") as root:
        (root / "checkpoint").write_text("x")
    assert (tmp_path / "runs" / "a" / "checkpoint").read_text() == "x"
    with workdir(None, "bench-") as root:
        (root / "checkpoint").write_text("x")
        assert root.name.startswith("bench-")
    assert not root.exists()


def test_a_runs_header_names_the_command_commit_device_and_shape():
    header = run_header("loadtests/soak.py", ["--tiny", "--duration", "5"], "cpu", "tiny")
    assert header["command"] == "python loadtests/soak.py --tiny --duration 5"
    assert header["commit"] == commit() and header["device"] == "cpu" and header["shape"] == "tiny"
    assert header["date"].endswith("+00:00") and header["python"].count(".") == 2
    assert "gpu" not in header  # named only on CUDA
