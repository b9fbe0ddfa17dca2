"""The layering of DESIGN.md, checked: protos <- edge_agent <- trainer, no cycles, the service without torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("edge_agent", "trainer")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import; the project uses absolute imports"
            base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def test_the_edge_never_imports_the_trainer() -> None:
    modules = _modules()
    offenders = {
        name: sorted(m for m in _imports(path, name, modules) if m.split(".")[0] == "trainer")
        for name, path in modules.items()
        if name.split(".")[0] == "edge_agent"
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # A package's __init__ that re-exports its modules is not a cycle with them.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles[:5]


def test_service_commands_run_without_torch(tmp_path: Path) -> None:
    # A site-customising shim makes `import torch` fail in the child, as on a box without torch.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.') or name in ('torchvision', 'onnxscript'):\n"
        "            raise ImportError(f'{name} is blocked for this test')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}
    store = tmp_path / "exports"
    for args in (
        ["serve", "--help"],
        ["fleet", "create", "f", "--store", str(store)],
        ["fleet", "list", "--store", str(store)],
        ["fleet", "status", "f", "--store", str(store), "--state-dir", str(tmp_path / "state")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
        )
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert proc.returncode != 0 and "blocked" in proc.stderr  # the shim works: the commands above ran without torch


def test_repair_checks_its_version_before_training(tmp_path: Path) -> None:
    import time

    from conftest import run_cli, tiny_bundle

    bundle = tiny_bundle(tmp_path / "v3", "default", 3) / "bundle"
    t0 = time.monotonic()
    code, _, err = run_cli("trainer", "repair", "--bundle", str(bundle), "--quarantine", str(tmp_path / "q"),
                           "--dataset", "fashion-mnist", "--out", str(tmp_path / "r"), "--version", "2",
                           check=False)  # fmt: skip
    assert code == 2 and "--version 2 must be above the deployed bundle's v3" in err, err[-1500:]
    assert time.monotonic() - t0 < 60 and not (tmp_path / "r").exists()


def test_no_function_is_longer_than_120_lines() -> None:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long
