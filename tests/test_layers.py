"""No module imports from a layer above its own: every import in hybridchat/, at the top of a module
or inside a function, is checked against the layer table below."""

import ast
from pathlib import Path

# The layers, low to high, and what each may import besides itself. model, data and retrieval sit
# side by side on core and know nothing of each other; infra wires them up without the answering
# (rag) or training built on it. Each entry point (a top-level module or package run with
# python -m) is a layer of its own: entry points do not import each other, except that results, which
# hashes what other apps' commands compose to, reads their schemas (READS_APP_SCHEMAS).
MAY_IMPORT = {
    "core": set(),
    "model": {"core"},
    "data": {"core"},
    "retrieval": {"core"},
    "rag": {"core", "model", "data", "retrieval"},
    "infra": {"core", "model", "data", "retrieval"},
    "training": {"core", "model", "data", "retrieval", "rag", "infra"},
}
ENTRY_POINTS = {"train", "evaluate", "chat", "serve", "kb", "qa", "plan", "bench", "results", "report", "import"}
READS_APP_SCHEMAS = {("results", "hybridchat.evaluate"), ("results", "hybridchat.plan")}
PACKAGE = Path(__file__).resolve().parents[1] / "hybridchat"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """hybridchat.<layer>.…; `hybridchat` alone (the package's __init__) counts as core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "core"


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The hybridchat modules `module` imports anywhere in its body; `from a import b` counts as a.b
    when b is a module (`from hybridchat import plan`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if is_module(full) else base)
    return {n for n in names if n == "hybridchat" or n.startswith("hybridchat.")}


def edges() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [(module, target) for target in sorted(imported(tree, module, path.name == "__init__.py"))]
    return found


def allowed(source: str, target: str) -> bool:
    src, dst = layer(source), layer(target)
    if src == dst:
        return True
    if src in ENTRY_POINTS:
        return dst not in ENTRY_POINTS or (src, target) in READS_APP_SCHEMAS
    return dst in MAY_IMPORT[src]


def test_the_table_names_every_package_and_entry_point():
    on_disk = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert on_disk == set(MAY_IMPORT) | ENTRY_POINTS


def test_the_walk_sees_imports_inside_functions():
    """checkpoint.load_model's imports were function-local once: the walk must not stop at the top."""
    tree = ast.parse("def f():\n    from hybridchat.training import loop\n")
    assert imported(tree, "hybridchat.infra.x", False) == {"hybridchat.training.loop"}


def test_the_walk_finds_the_known_edges():
    found = set(edges())
    assert ("hybridchat.rag.answer", "hybridchat.model.engine") in found
    assert ("hybridchat.train", "hybridchat.infra.planner") in found  # `from hybridchat.infra import planner`


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{source} -> {target}" for source, target in edges() if not allowed(source, target)]
    assert not upward, "imports against the layering (tests/test_layers.py):\n" + "\n".join(upward)
