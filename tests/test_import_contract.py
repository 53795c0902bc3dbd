"""The import contract (design §2), checked on every `make test`, not by review.

Static: `lint-imports` checks the contracts in pyproject.toml's `[tool.importlinter]` over every
import statement in the product packages, at module level, inside functions and under `if`,
directly or through another module:

- balancer/ and protocol/ import no torch (nor triton, safetensors) and nothing of replica/ or
  kernels/, so the balancer installs and runs without the engine;
- protocol/, predictors/ and loadgen/ import nothing of replica/ or kernels/;
- protocol/ imports nothing of balancer/ (the replica side imports protocol/ too).

At run time: what a balancer-only process imports, in a fresh interpreter, leaves torch out of
`sys.modules` (this also catches an `importlib.import_module` the static check cannot see).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["balancer", "protocol", "predictors", "loadgen", "simulator", "replica", "kernels",
            "kvfleet", "harness"]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail(f"lint-imports not found next to {sys.executable}: install the dev extra "
                    "with `pip install -c constraints.txt -e '.[dev]'` (or run `make test`)")
    return subprocess.run([str(exe), "--no-cache", "--no-logo", "pyproject.toml"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


def _copy_tree(dst: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns(
            "__pycache__", "*.so", "*.c", "*.jsonl", "*.md"))


@pytest.mark.parametrize("module, line, contract", [
    # A function-level torch import in the balancer.
    ("balancer/health.py", "def _probe():\n    import torch\n",
     "balancer and protocol import no torch"),
    # A conditional import of the engine in protocol/.
    ("protocol/load.py", "if False:\n    from replica.engine import Engine\n",
     "protocol, predictors and loadgen import nothing of the engine"),
    # An indirect one: loadgen -> kvfleet.cmd_replica -> replica.
    ("loadgen/report.py", "def _f():\n    from kvfleet import cmd_replica\n",
     "protocol, predictors and loadgen import nothing of the engine"),
    ("protocol/events.py", "def _f():\n    from balancer.registry import Registry\n",
     "protocol imports nothing of the balancer"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, line, contract):
    _copy_tree(tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + "\n\n" + line)
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout
    # The report names the offending module, so the reader knows what to fix.
    assert module.removesuffix(".py").replace("/", ".") in result.stdout, result.stdout


@pytest.mark.parametrize("code", [
    "import balancer.app",
    "import kvfleet.cmd_balancer",
    # `kvfleet balancer ...` builds the whole CLI parser first.
    "import kvfleet.cli; kvfleet.cli.build_parser()",
    "import protocol.events, protocol.hashing, protocol.openai_api, protocol.tokenizer",
])
def test_a_balancer_process_leaves_torch_unimported(code):
    probe = (f"{code}\nimport sys\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{code!r} imported {result.stdout.strip()}"
