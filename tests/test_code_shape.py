"""The shape of the code: no module over 450 lines and no function over 60, so that each file holds one idea and
each function one step (the Triton kernel files aside: a kernel is one long function by nature).

Both rules hold for all of `loramux/`. `python tests/test_code_shape.py` lists every offender.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
KERNEL_FILES = {  # Triton kernels, allowed long files and long functions
    "loramux/server/layers/lora_kernels.py",
    "loramux/server/layers/nf4_kernels.py",
    "loramux/server/layers/attention_kernels.py",
}
SCOPE = ("loramux",)


def modules(scopes: tuple[str, ...], root: Path = ROOT) -> list[tuple[str, str]]:
    """(path from `root`, source) of every Python file under the scopes, kernel files aside."""
    found = []
    for scope in scopes:
        for path in sorted((root / scope).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if name not in KERNEL_FILES:
                found.append((name, path.read_text()))
    return found


def long_files(scopes: tuple[str, ...], root: Path = ROOT) -> list[str]:
    return [
        f"{name}: {len(source.splitlines())} lines"
        for name, source in modules(scopes, root)
        if len(source.splitlines()) > MAX_FILE_LINES
    ]


def long_functions(scopes: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """Every function (nested ones too) longer than the limit, from its `def` line to its last line."""
    found = []
    for name, source in modules(scopes, root):
        for node in ast.walk(ast.parse(source, name)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_is_over_450_lines():
    assert long_files(SCOPE) == []


def test_no_function_is_over_60_lines():
    assert long_functions(SCOPE) == []


def test_the_checks_find_long_files_and_functions_and_pass_over_only_the_kernel_files(tmp_path):
    assert all((ROOT / name).exists() for name in KERNEL_FILES)  # a kernel file moved would leave the allow-list
    layers = tmp_path / "loramux/server/layers"
    layers.mkdir(parents=True)
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # with its def line, one too many
    for name in ("lora.py", "lora_kernels.py"):
        (layers / name).write_text(f"def step():\n{body}\n\nasync def fine():\n    pass\n" + "\n" * MAX_FILE_LINES)
    assert long_functions(("loramux",), tmp_path) == ["loramux/server/layers/lora.py:1 step: 61 lines"]
    assert long_files(("loramux",), tmp_path) == ["loramux/server/layers/lora.py: 515 lines"]


if __name__ == "__main__":
    offenders = long_files(SCOPE) + long_functions(SCOPE)
    print("\n".join(offenders) or "none")
    sys.exit(1 if offenders else 0)
