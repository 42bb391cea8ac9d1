"""The package's import structure: one-way layers, no circles (lazy imports included).

(That `import nanollama.kernels` stays light is tests/kernels/test_import.py.)"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nanollama"

# Lower layers never import higher ones: kernels <- models / data <- distributed / observe <- train
# <- evaluate / generate / launcher <- analysis. utils and the generic config loader sit below all.
LAYERS = {
    "utils": 0,
    "config": 1,
    "kernels": 2,
    "models": 3,
    "data": 3,
    "distributed": 4,
    "observe": 4,
    "train": 5,
    "runs": 6,
    "evaluate": 7,
    "eval_length": 7,
    "generate": 7,
    "launcher": 7,
    "probe": 7,
    "convert": 7,
    "analysis": 8,
    "scaling": 8,
    "report": 8,
    "track": 8,
}


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("nanollama", *p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path) -> set[str]:
    """Every nanollama module `path` imports, anywhere in it (functions and TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nanollama"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanollama"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_top_level_module_has_a_layer():
    tops = {m.split(".")[1] for m in modules() if m.count(".") >= 1}
    assert tops - set(LAYERS) <= {"_gssm_sampler"}, tops - set(LAYERS)


def test_imports_run_one_way():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        here = layer(name)
        for target in imports(path):
            if target in mods and layer(target) is not None and here is not None and layer(target) > here:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    mods = modules()
    edges = {m: {t for t in imports(p) if t in mods and t != m and not t.startswith(m + ".")} for m, p in mods.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    # A package's __init__ importing its own submodules is not a circle; anything else that returns is.
    circles = sorted(
        m for m in mods if any(m in reach(t) and not (t.startswith(m + ".") or m.startswith(t + ".")) for t in edges[m])
    )
    assert not circles, f"modules on an import circle: {circles}"


def test_the_trainer_names_no_model_and_no_data_source():
    for path in (ROOT / "train").glob("*.py"):
        text = path.read_text()
        for name in ("GSSM", "gssm", "Transformer", "transformer"):
            assert name not in text, f"{path.name} names {name}"


def test_text_data_imports_no_optional_tokenizer_at_module_level():
    """sentencepiece, tokenizers and tiktoken are optional (the `text` extra): imported only when used."""
    optional = {"sentencepiece", "tokenizers", "tiktoken"}
    for path in (ROOT / "data" / "text").glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not top & optional, f"{path.name} imports {top & optional} at module level"
