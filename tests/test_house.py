"""The house rules of src/kbundle, read from its source (issue 18): no import cycle, counting
imports inside functions; container lockdown options in one module (plus the Slurm node
agent, which renders them as flags); Docker clients made in one module; image/ never
imports flows/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kbundle"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    graph[name] |= {full} if full in mods else ({base} if base in mods else set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_image_never_imports_flows():
    graph = import_graph()
    reaching = {m: sorted(t for t in targets if t.startswith("kbundle.flows")) for m, targets in graph.items()}
    assert {m: t for m, t in reaching.items() if m.startswith("kbundle.image") and t} == {}


def _files_matching(pattern: str) -> set[str]:
    found = set()
    for name, path in modules().items():
        if re.search(pattern, path.read_text(encoding="utf-8")):
            found.add(name)
    return found


def test_lockdown_options_live_in_the_policy_module_and_the_node_agents_rendering():
    lockdown = r"cap_drop|no-new-privileges|pids_limit|security_opt|\"read_only\""
    assert _files_matching(lockdown) == {"kbundle.image.policy", "kbundle.kernel.node_agent"}


def test_docker_clients_are_made_in_one_module():
    assert _files_matching(r"docker\.from_env\(|DockerClient\(|APIClient\(") == {"kbundle.image.engine"}
