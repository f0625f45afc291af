"""The package's shape (README "Code map"): the root holds entry points only, every subpackage says what it owns,
and imports run one way, down the layers — inside functions too, so no import circle can hide in a lazy import."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "bigtrain"
# Bottom to top, as the README's code map draws them: a module may import its own layer and the layers below.
LAYERS = ["core", "config", "metrics", "models", "interop", "data", "tasks", "parallel", "checkpoint", "plan", "eval",
          "train", "cli"]
ENTRY_POINTS = {"__init__.py", "__main__.py", "cli.py", "cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return "cli" if len(parts) == 1 or parts[1] in ("cli", "__main__") else parts[1]


def _imports(path: Path):
    """(line, imported bigtrain module) of every import in `path`, but those only a type checker runs."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("bigtrain.") or name == "bigtrain":
                yield node.lineno, name


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_root_holds_entry_points_only():
    extra = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS)
    assert not extra, f"move {extra} into the subpackage for its job (README: Code map)"
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert subpackages <= set(LAYERS), f"{subpackages - set(LAYERS)}: add the package to LAYERS and the code map"


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_subpackage_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 15, f"bigtrain/{package}/__init__.py: say in 2-4 lines what it owns and imports"


def test_imports_run_down_the_layers():
    known = {_module_name(p) for p in MODULES}
    upward = []
    for path in MODULES:
        here = _module_name(path)
        for line, name in _imports(path):
            target = name if name in known else name.rpartition(".")[0]  # `from pkg import function`
            if target not in known or here.startswith(target + "."):  # a module's own package __init__: no edge
                continue
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(here)):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    known = {_module_name(p) for p in MODULES}
    graph = {}
    for path in MODULES:
        here = _module_name(path)
        targets = {name if name in known else name.rpartition(".")[0] for _, name in _imports(path)}
        graph[here] = {t for t in targets if t in known and t != here and not here.startswith(t + ".")}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [" -> ".join(c) for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_launcher_imports_only_what_starts_a_job():
    """launcher/ runs before torch is imported: it may use core, config, plan's checks and train's exit codes."""
    allowed = {"core", "config", "models", "plan", "train"}
    used = {(_layer(name), f"{p.name}:{line}") for p in (REPO / "launcher").glob("*.py") for line, name in _imports(p)}
    assert {layer for layer, _ in used} <= allowed, sorted(used)


def test_no_file_over_400_lines_and_no_function_over_60():
    """Files and functions a reader takes in whole (a longer one splits by job: see the code map)."""
    long_files, long_functions = [], []
    for path in MODULES + sorted((REPO / "launcher").glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: "
                                      f"{node.end_lineno - node.lineno + 1} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)
