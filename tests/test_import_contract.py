"""The import contract (design §2), checked on every `make test`, not by review.

Static: `lint-imports` checks the contracts in pyproject.toml's `[tool.importlinter]` over every
import statement in the product packages, at module level, inside functions and under `if`,
directly or through another module:

- balancer/ and protocol/ import no torch (nor triton, safetensors) and nothing of replica/ or
  kernels/, so the balancer installs and runs without the engine;
- protocol/, predictors/ and loadgen/ import nothing of replica/ or kernels/;
- protocol/ imports nothing of balancer/ (the replica side imports protocol/ too);
- loadgen/'s modules import each other one way only (no cycle such as synthetic <-> traces).

At run time: what a balancer-only process imports, in a fresh interpreter, leaves torch out of
`sys.modules` (this also catches an `importlib.import_module` the static check cannot see).
"""

from __future__ import annotations

import re
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
    assert "4 kept, 0 broken" in result.stdout, result.stdout


def _copy_tree(dst: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns(
            "__pycache__", "*.so", "*.c", "*.jsonl", "*.md"))


# (file, lines appended to it, the start of the contract's name, what the report names so the reader knows
# what to fix)
@pytest.mark.parametrize("module, line, contract, named", [
    # A function-level torch import in the balancer.
    ("balancer/health.py", "def _probe():\n    import torch\n",
     "balancer and protocol import no torch", "balancer.health -> torch"),
    # A conditional import of the engine in protocol/.
    ("protocol/load.py", "if False:\n    from replica.engine import Engine\n",
     "protocol, predictors and loadgen import nothing of the engine", "protocol.load -> replica.engine"),
    # An indirect one: loadgen -> kvfleet.cmd_replica -> replica.
    ("loadgen/report.py", "def _f():\n    from kvfleet import cmd_replica\n",
     "protocol, predictors and loadgen import nothing of the engine", "loadgen.report -> kvfleet.cmd_replica"),
    ("protocol/events.py", "def _f():\n    from balancer.registry import Registry\n",
     "protocol imports nothing of the balancer", "protocol.events -> balancer.registry"),
    # The cycle that was: traces took gamma_arrivals from synthetic, which reads TraceRequest.
    ("loadgen/traces.py", "def _f():\n    from loadgen.synthetic import synthesize\n",
     "loadgen's modules import each other one way only", ".traces -> .synthetic"),
])
def test_a_new_import_that_breaks_a_contract_fails(tmp_path, module, line, contract, named):
    _copy_tree(tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + "\n\n" + line)
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert re.search(rf"^{re.escape(contract)}.* BROKEN$", result.stdout, re.M), result.stdout
    assert named in result.stdout, result.stdout


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
