"""The package's shape: imports flow one way (no cycle, no layer importing a layer above it), and the loop and the
diagnostics reach models only through the declared protocol (no capability probing)."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "ermoe"
# Lower layers first; a module may import from its own layer or below. `settings` (how a setting is checked)
# depends on nothing of ermoe, `data` on settings alone.
LAYERS = [
    {"settings", "weight_decay", "registry", "devices", "host_traffic", "files", "version",
     "job_errors"},
    {"data"},
    {"routing", "orthogonal"},
    {"experts", "dispatch"},
    {"moe"},
    {"distributed"},
    {"models"},
    {"analysis"},
    {"tasks"},
    {"train"},
    {"study"},
    {"cli", "__init__", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """ermoe modules a file imports (at any depth, TYPE_CHECKING blocks excluded), resolved to module names."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m.startswith("ermoe")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in SRC.rglob("*.py")}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_flow_one_way():
    wrong = [f"{m} imports {d}" for m, deps in _graph().items() for d in deps
             if d != "ermoe" and _layer(d) > _layer(m)]
    assert not wrong, wrong


def test_no_private_name_is_imported_from_another_package():
    """A name with a leading underscore is its package's own: study/runner.py imported train.config's _build and
    _merge (issue 39); they are public now (build_section, merge_settings)."""
    wrong = []
    for path in SRC.rglob("*.py"):
        own = _module_name(path).split(".")[:2]
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")
            target = base[:len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and target[:2] != own:
                wrong.append(f"{path.relative_to(SRC)}:{node.lineno} imports {private} from {'.'.join(target)}")
    assert not wrong, wrong


def test_no_capability_probing_in_the_loop_and_the_diagnostics():
    probes = []
    for folder in ("train", "analysis", "tasks"):
        for path in (SRC / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr",
                                                                                                        "getattr"):
                    probes.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not probes, probes


def test_the_trainer_stays_a_short_loop_and_every_kind_registers_one_way():
    """Issue 39's targets, measured as docs/architecture.md does (benchmarks/code_shape.py): the loop's methods
    within 150 lines, no class in ermoe/train over 250, one registration mechanism for every kind."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "code_shape.py"
    spec = importlib.util.spec_from_file_location("code_shape", path)
    shape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shape)
    measured = shape.measure(Path(__file__).resolve().parents[1] / "src" / "ermoe")
    assert measured["trainer loop (lines)"] <= 150
    assert measured["largest class in train/"][1] <= 250, measured["largest class in train/"]
    assert measured["registries (ermoe.registry.Registry)"] == "dataset, model, router, study kind, task"
    assert measured["other registration dicts"] == "none"
