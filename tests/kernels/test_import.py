"""`import nanollama.kernels` stays light: no Dynamo, no Triton compiler, nothing of the model, trainer or data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from nanollama.kernels import _triton, dispatch

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ["torch._dynamo", "torch._inductor", "triton", "triton.compiler", "sympy"]
OURS = ["nanollama.models", "nanollama.train", "nanollama.data", "nanollama.distributed", "nanollama.observe"]


def test_import_loads_no_dynamo_triton_or_model_code():
    code = (
        "import sys, json, torch; before = set(sys.modules); import nanollama.kernels; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "nanollama.kernels.attention" in loaded  # the check sees our modules
    assert not loaded & set(HEAVY + OURS), sorted(loaded & set(HEAVY + OURS))
    assert not any(m.startswith(("torch._dynamo.", "triton.", "nanollama.data.")) for m in loaded)


def test_constant_marker_is_the_one_torch_sets():
    """constant_to_dynamo sets what torch.compiler.assume_constant_result sets, without importing Dynamo."""

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(lambda: True)
    assert (
        {k for k in vars(marked)} == {k for k in vars(_triton.constant_to_dynamo(probe))} == {"_dynamo_marked_constant"}
    )
    assert dispatch.triton_available._dynamo_marked_constant and dispatch.mode._dynamo_marked_constant


def _kernel_imports() -> dict[str, set[str]]:
    """module -> the nanollama.kernels modules it imports, at any depth of its code (lazy imports included)."""
    import ast

    root = ROOT / "nanollama" / "kernels"
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanollama.kernels"):
                tail = node.module.removeprefix("nanollama.kernels").lstrip(".")
                deps |= {tail} if tail else {a.name for a in node.names} & names
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("nanollama.kernels.") for a in node.names} & names
        graph[name] = deps - {name}
    return graph


def test_kernel_imports_run_one_way():
    """No import circle among the kernel modules, lazy imports counted (DESIGN.md: imports run one way)."""
    graph = _kernel_imports()
    assert "masks" in graph["block_masks"] and "block_masks" not in graph["masks"]
    assert "attention_backends" in graph["dispatch"] and "dispatch" in graph["attention"]
    done, stack = set(), []

    def visit(name):
        assert name not in stack, " -> ".join([*stack, name])
        if name in done:
            return
        stack.append(name)
        for dep in graph[name]:
            visit(dep)
        stack.pop()
        done.add(name)

    for name in graph:
        visit(name)
