"""The rooms of the code stay as docs/architecture.md draws them: checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "common", "ping_client", "echo_client", "cluster", "bench")


def imports(path: Path, *, typing_too: bool) -> list[tuple[str, list[str]]]:
    """(module, names) for every import of ours in ``path``; TYPE_CHECKING blocks optional."""
    found: list[tuple[str, list[str]]] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                if typing_too:
                    walk(child)
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                found.append((child.module, [a.name for a in child.names]))
            elif isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names)
            walk(child)

    walk(ast.parse(path.read_text()))
    return found


def modules() -> dict[str, Path]:
    """Every module of the project, by dotted name."""
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts): p
        for package in PACKAGES
        for p in (REPO / package).glob("*.py")
    }


@pytest.mark.parametrize("typing_too", [False, True], ids=["at-run-time", "type-only-too"])
def test_no_import_cycles(typing_too: bool) -> None:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        deps = set()
        for module, names in imports(path, typing_too=typing_too):
            for candidate in (module, *(f"{module}.{n}" for n in names)):
                if candidate in known and candidate != name:
                    deps.add(candidate)
        graph[name] = deps
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*trail[trail.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_only_the_engine_and_its_plugins_import_amqtt() -> None:
    users = {
        name
        for name, path in modules().items()
        if name.startswith("broker.")
        and any(m.split(".")[0] == "amqtt" for m, _ in imports(path, typing_too=True))
    }
    assert users <= {"broker.engine", "broker.plugins"}


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders = [
        f"{name}: {module}.{n}"
        for name, path in modules().items()
        if name.startswith("broker.")
        for module, names in imports(path, typing_too=True)
        if module.split(".")[0] in PACKAGES
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert offenders == []


def test_the_hub_and_the_flows_do_not_import_the_connection() -> None:
    for room in ("broker.hub", "broker.flows", "broker.lifetimes"):
        path = modules()[room]
        assert all(not m.startswith("broker.connection") for m, _ in imports(path, typing_too=True))


def test_only_the_fixes_module_touches_aiomqtts_private_names() -> None:
    """common.aiomqtt_fixes is the one place that reads aiomqtt's internals, as the docs say.

    Every private name aiomqtt's Client defines, and those the fixes check at start-up, read
    on anything but ``self`` (a class's own ``self._lock`` is its own) in the clients' code.
    """
    import aiomqtt  # noqa: PLC0415 - only this test needs it

    from common.aiomqtt_fixes import INTERNALS, OVERRIDDEN  # noqa: PLC0415

    private = {n for n in vars(aiomqtt.Client) if n.startswith("_") and not n.startswith("__")}
    private |= set(INTERNALS) | set(OVERRIDDEN)
    assert {"_connected", "_client_connect"} <= private  # the check sees what it is about
    offenders = [
        f"{name}:{node.lineno}: {ast.unparse(node)}"
        for name, path in modules().items()
        if name.split(".")[0] != "broker" and name != "common.aiomqtt_fixes"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in private
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]  # fmt: skip
    assert offenders == []
