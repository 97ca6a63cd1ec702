"""The team's standard, held: no function in the library, the trainer or the studio is longer than
one screen (80 lines), so each reads top to bottom on its own."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    found = []
    for folder in ("restuning", "trainers", "webui"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_a_screen():
    assert long_functions(REPO) == []


# The project's layers, lowest first: a module imports only from its own layer or lower ones,
# imports inside functions included, and no two modules import each other by any path. The
# training recipe never reaches up into the run service, which starts it as a process.
LAYERS = ("restuning", "trainers", "trainers.service", "webui", "app", "bench|scripts")


def layer_of(module: str) -> int | None:
    best = None
    for level, names in enumerate(LAYERS):
        for name in names.split("|"):
            if module == name or module.startswith(name + "."):
                best = level  # the deepest match: trainers.service.jobs is in trainers.service
    return best


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each project module and the project modules it imports, at any depth of the code."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for top in ("restuning", "trainers", "webui", "bench", "scripts") for p in (root / top).rglob("*.py")}
    files["app"] = root / "app.py"
    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import module` names a module; `from module import name` the module itself
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[module] = {t if t in files else t.rpartition(".")[0] for t in targets
                         if t in files or t.rpartition(".")[0] in files} - {module}
    return graph


def test_no_import_reaches_up_a_layer():
    upward = [f"{m} -> {t}" for m, ts in import_graph(REPO).items() for t in sorted(ts)
              if layer_of(t) is not None and layer_of(m) is not None and layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_circles():
    graph, circles = import_graph(REPO), []

    def visit(module, path):
        for target in graph.get(module, ()):
            if target == path[0]:
                circles.append(" -> ".join(path + [target]))
            elif target not in path and target > path[0]:  # each circle once, from its smallest name
                visit(target, path + [target])

    for module in sorted(graph):
        visit(module, [module])
    assert circles == []


def test_the_layer_check_sees_an_upward_import_inside_a_function(tmp_path):
    for top in ("restuning", "trainers", "webui", "bench", "scripts"):
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "app.py").write_text("")
    (tmp_path / "trainers" / "service").mkdir()
    (tmp_path / "trainers" / "service" / "__init__.py").write_text("")
    (tmp_path / "trainers" / "service" / "jobs.py").write_text("from .. import recipe\n")
    (tmp_path / "trainers" / "recipe.py").write_text("def f():\n    from .service import jobs\n")
    graph = import_graph(tmp_path)
    assert graph["trainers.recipe"] == {"trainers.service.jobs"}
    assert graph["trainers.service.jobs"] == {"trainers.recipe"}
    assert layer_of("trainers.service.jobs") > layer_of("trainers.recipe")
