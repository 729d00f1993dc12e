"""The import graph of trainer/, data_tools/, launch/ and bench/: no cycle, and imports run one way.

Every import statement counts, those inside functions too (a late import hides a cycle from the
interpreter, not from a reader). The rules (docs/DESIGN.md section 8, README "Map of the code"):
  - no cycle between modules;
  - trainer/ (the library) imports none of data_tools/, launch/, bench/, tests/;
  - data_tools/ imports none of launch/, bench/, tests/; nothing imports tests/;
  - inside trainer/, a module imports only its own layer or those below:
      helper_signals, distributed, device, stats -> data -> kernels -> model -> monitor -> tracking -> engine
    (with trainer.config) -> run_folder;
  - no module imports another module's private (_underscore) names.
Read from the source with ast: nothing is imported, so the test needs no GPU and no optional package.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.constants import REPO

ROOTS = ("trainer", "data_tools", "launch", "bench")
INTERNAL = (*ROOTS, "tests")

# trainer/'s layers, lowest first; a module belongs to the first prefix it starts with. The experiment
# config (trainer.config) assembles the sections' configs and is what the engine runs: it shares the
# engine's layer (the module graph itself has no cycle). Every trainer module must be in a layer.
TRAINER_LAYERS = (
    ("trainer.helper_signals", "trainer.distributed", "trainer.config_checks", "trainer.device", "trainer.stats"),
    ("trainer.data",),
    ("trainer.kernels",),
    ("trainer.model",),
    ("trainer.monitor",),
    ("trainer.tracking",),
    ("trainer.engine", "trainer.config"),
    ("trainer.run_folder", "trainer.doctor"),
)
# packages each top-level folder must not import
FORBIDDEN = {
    "trainer": ("data_tools", "launch", "bench", "tests"),
    "data_tools": ("launch", "bench", "tests"),
    "launch": ("tests",),
    "bench": ("tests",),
}

def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files() -> dict[str, Path]:
    files = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            files[module_name(path)] = path
    for path in sorted((REPO / "tests").rglob("*.py")):
        files[module_name(path)] = path
    return files


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, internal ones only.
    `from pkg import name` counts as importing pkg.name when that is a module, else pkg."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    siblings = {p.stem for p in path.parent.glob("*.py")}
    folder = module.rsplit(".", 1)[0] if not is_package else module
    found = []

    def internal(name: str) -> str | None:
        top = name.split(".")[0]
        if top in INTERNAL:
            return name
        if top in siblings and folder.split(".")[0] in ("bench", "launch"):   # a script's sibling, by sys.path
            return f"{folder}.{name}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = internal(alias.name)
                if target:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = internal(node.module or "")
            if not base:
                continue
            taken = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append((sub, [], node.lineno))
                else:
                    taken.append(alias.name)
            if taken:
                found.append((base, taken, node.lineno))
    return found


def build_graph() -> tuple[dict[str, set[str]], dict[str, str]]:
    """The module graph (edges between internal modules) and the rule violations: {violation: where}."""
    files = python_files()
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    problems: dict[str, str] = {}
    for module, path in files.items():
        top = module.split(".")[0]
        rel = path.relative_to(REPO)
        if top == "trainer" and module != "trainer" and layer(module) is None:
            problems[f"{module} is in no layer (add it to TRAINER_LAYERS)"] = str(rel)
        for target, names, line in imports_of(module, path, known):
            what, where = f"{module} imports {target}", f"{rel}:{line}"
            if target != module and target in known:
                graph[module].add(target)
            if top == "tests":
                continue                                   # tests may import anything, tests included
            if target.split(".")[0] in FORBIDDEN.get(top, ()):
                problems.setdefault(f"{what} ({top}/ must not import {target.split('.')[0]}/)", where)
            if top == "trainer" and target.startswith("trainer"):
                mine, theirs = layer(module), layer(target)
                if mine is not None and theirs is not None and theirs > mine:
                    problems.setdefault(f"{what} (upward: layer {theirs} {TRAINER_LAYERS[theirs][0]} above "
                                        f"layer {mine} {TRAINER_LAYERS[mine][0]})", where)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.setdefault(f"{what} (private names {', '.join(private)})", where)
    return graph, problems


def layer(module: str) -> int | None:
    for i, prefixes in enumerate(TRAINER_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def cycles(graph: dict[str, set[str]], only: tuple[str, ...] = ROOTS) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), among modules under `only`."""
    nodes = [m for m in graph if m.split(".")[0] in only]
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:            # iterative would be longer; the graph is a few hundred nodes deep at most
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w.split(".")[0] not in only:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def violations() -> dict[str, str]:
    """{violation: where}, cycles included."""
    graph, problems = build_graph()
    for component in cycles(graph):
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
        problems[f"{', '.join(component)} ({'; '.join(edges)})"] = "import cycle (late imports count too)"
    return problems


def test_import_graph_has_no_cycle_and_runs_one_way():
    problems = [f"{where}: {p}" for p, where in violations().items()]
    assert not problems, "imports against the layout:\n  " + "\n  ".join(problems)


def test_the_walk_sees_what_it_must(tmp_path):
    """The parser itself: function-level and relative imports count, private names are seen."""
    path = REPO / "trainer" / "data" / "decode.py"
    found = imports_of("trainer.data.decode", path, set(python_files()))
    targets = {t for t, _, _ in found}
    assert "trainer.data.shard_format" in targets and "trainer.data.skips" in targets   # relative
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from trainer.engine.trainer import _private, Trainer\n")
    (found_late,) = imports_of("trainer.data.mod", src, {"trainer.engine.trainer"})
    assert found_late[0] == "trainer.engine.trainer" and found_late[1] == ["_private", "Trainer"]
    graph = {"trainer.a": {"trainer.b"}, "trainer.b": {"trainer.c"}, "trainer.c": {"trainer.a"}, "trainer.d": set()}
    assert cycles(graph) == [["trainer.a", "trainer.b", "trainer.c"]]
