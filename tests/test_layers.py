"""The import graph of the runtime package, read from its source with `ast`.

swarmcache runs on hypervisor hosts; swarmtools (the network test bed, the test origin,
the simulator) is for tests and benchmarks and may import swarmcache, never the other
way round. Inside swarmcache imports should flow one way: no cycles but the known ones,
which are listed below and may only go away.

Every import statement counts wherever it stands: at the top, in a function (a lazy
import is still a dependency) or under `if TYPE_CHECKING:` (a cycle hidden from the
interpreter is still one between the modules). An edge goes to the module an import
names: `from .origin import Origin` to swarmcache.origin, `from . import store` to
swarmcache.store.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
RUNTIME = "swarmcache"
TOOLS = "swarmtools"
MAX_CYCLES = 1000  # more than this means a tangle, not a few cycles to list

# Import cycles among swarmcache's modules today, each written from its smallest module
# name on, in import order (a imports b, ..., the last imports a). Being removed by the
# fetch-core rewrite (issue 7): add nothing here; when a cycle is gone this test fails
# until its entry is deleted, so the list only shrinks.
KNOWN_CYCLES: frozenset[tuple[str, ...]] = frozenset({})


@dataclass(frozen=True)
class Import:
    """One module named by an import statement (or importlib call) of a module."""

    module: str  # the importer
    target: str  # the module it names
    line: int


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package in `package_dir`."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        assert name is not None
        return name
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, is_package: bool, source: str, known: set[str]) -> Iterator[Import]:
    """Every module `source` (the text of `module`) names in an import, anywhere in it.

    `from X import y` names X.y if that is a module of `known`, else X.
    `importlib.import_module("X")` and `__import__("X")` with a literal name count too.
    """
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(module, sub if sub in known else base, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(module, node.args[0].value, node.lineno)


def package_imports(package_dir: Path) -> list[Import]:
    """Every import in every module of the package in `package_dir`."""
    files = module_names(package_dir)
    known = set(files)
    out = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        out.extend(imports_of(module, is_package, path.read_text(), known))
    return out


def in_package(name: str, package: str) -> bool:
    """`name` is `package` or one of its modules."""
    return name == package or name.startswith(package + ".")


def cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle of a directed graph (self-loops left out), each from its
    smallest node on: from each node, walk only through larger ones back to it."""
    found: set[tuple[str, ...]] = set()
    for start in sorted(edges):
        path = [start]
        on_path = {start}
        stack = [iter(sorted(edges[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                on_path.discard(path.pop())
            elif nxt == start and len(path) > 1:
                found.add(tuple(path))
                if len(found) > MAX_CYCLES:
                    raise AssertionError(f"more than {MAX_CYCLES} import cycles")
            elif nxt > start and nxt not in on_path and nxt in edges:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return found


def graph(imports: list[Import], package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (itself left out)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.module, set())
        if in_package(imp.target, package) and imp.target != imp.module:
            edges[imp.module].add(imp.target)
    return edges


@pytest.fixture(scope="module")
def runtime_imports() -> list[Import]:
    """The imports of src/swarmcache."""
    package_dir = SRC / RUNTIME
    assert (package_dir / "__init__.py").is_file(), package_dir
    imports = package_imports(package_dir)
    assert {"swarmcache.daemon", "swarmcache.fetch.fetcher"} <= {i.module for i in imports}
    return imports


def test_the_runtime_package_never_imports_swarmtools(runtime_imports: list[Import]) -> None:
    bad = [
        f"{i.module}, line {i.line}: imports {i.target}"
        for i in runtime_imports
        if in_package(i.target, TOOLS)
    ]
    assert not bad, "swarmcache runs on hypervisors; swarmtools is not installed there:\n" + (
        "\n".join(bad)
    )


def test_no_import_cycle_in_the_runtime_package_but_the_known_ones(
    runtime_imports: list[Import],
) -> None:
    found = cycles(graph(runtime_imports, RUNTIME))
    lines = {(i.module, i.target): i.line for i in reversed(runtime_imports)}

    def show(cycle: tuple[str, ...]) -> str:
        steps = zip(cycle, cycle[1:] + cycle[:1], strict=True)
        return " -> ".join(f"{a} (line {lines[a, b]})" for a, b in steps) + f" -> {cycle[0]}"

    new = sorted(found - KNOWN_CYCLES)
    assert not new, "new import cycles in swarmcache:\n" + "\n".join(map(show, new))
    gone = sorted(KNOWN_CYCLES - found)
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


# The floors of the house, top to bottom: a module may import its own floor's and
# lower floors' modules, never a higher floor's. The HTTP edge, then the fetch, then
# peers and origins (the network), then the store, then pure logic and the basics.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("swarmcache.__main__", "swarmcache.cli", "swarmcache.daemon", "swarmcache.warm_view"),
    (
        "swarmcache.access",
        "swarmcache.api",
        "swarmcache.peer_api",
        "swarmcache.glance_api",
        "swarmcache.warm",
        "swarmcache.seeding",
        "swarmcache.httpserver",
    ),
    ("swarmcache.fetch",),
    ("swarmcache.peers", "swarmcache.origin", "swarmcache.discovery", "swarmcache.httpfile"),
    ("swarmcache.store", "swarmcache.eviction", "swarmcache.limits"),
    (
        "swarmcache.exchange",
        "swarmcache.peerauth",
        "swarmcache.signing",
        "swarmcache.wire",
        "swarmcache.manifest",
        "swarmcache.ranges",
        "swarmcache.config",
        "swarmcache.metrics",
        "swarmcache.errors",
        "swarmcache",
    ),
)
# pure logic: no I/O library, no clock of its own (tested synchronously, driven by the
# simulator)
PURE = (
    "swarmcache.exchange",
    "swarmcache.wire",
    "swarmcache.manifest",
    "swarmcache.ranges",
    "swarmcache.peerauth",
    "swarmcache.signing",
)
IO_LIBRARIES = ("aiohttp", "asyncio", "zeroconf", "socket", "os", "threading", "time")
# inside the fetch: the orchestrator over the parts; landing (the disk) knows no network
FETCH_NETWORK_FREE = ("swarmcache.fetch.landing", "swarmcache.fetch.common")


def floor_of(module: str) -> int:
    """The floor of a swarmcache module (its longest matching prefix)."""
    best = (-1, -1)
    for n, floor in enumerate(FLOORS):
        for prefix in floor:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), n))
    assert best[1] >= 0, f"{module} is on no floor: add it to FLOORS"
    return best[1]


def test_imports_only_go_down_the_floors(runtime_imports: list[Import]) -> None:
    up = [
        f"{i.module} (floor {floor_of(i.module)}), line {i.line}: imports {i.target} "
        f"(floor {floor_of(i.target)})"
        for i in runtime_imports
        if in_package(i.target, RUNTIME) and floor_of(i.target) < floor_of(i.module)
    ]
    assert not up, "imports that go up a floor:\n" + "\n".join(up)


def test_pure_modules_do_no_io(runtime_imports: list[Import]) -> None:
    bad = [
        f"{i.module}, line {i.line}: imports {i.target}"
        for i in runtime_imports
        if i.module in PURE and i.target.split(".")[0] in IO_LIBRARIES
    ]
    assert not bad, "pure modules import I/O:\n" + "\n".join(bad)


def test_landing_knows_no_network(runtime_imports: list[Import]) -> None:
    """The fetch's disk side uses the store and the pure floor, nothing that talks."""
    allowed = floor_of("swarmcache.store")
    bad = [
        f"{i.module}, line {i.line}: imports {i.target}"
        for i in runtime_imports
        if i.module in FETCH_NETWORK_FREE
        and (
            i.target.split(".")[0] in ("aiohttp", "zeroconf", "socket")
            or (
                in_package(i.target, RUNTIME)
                and not in_package(i.target, "swarmcache.fetch")
                and floor_of(i.target) < allowed
            )
        )
    ]
    assert not bad, "the fetch's disk side imports the network:\n" + "\n".join(bad)


# -- the checker itself, on made-up modules ----------------------------------------------


@pytest.mark.parametrize(
    ("module", "is_package", "level", "name", "expected"),
    [
        ("pkg.a", False, 0, "os.path", "os.path"),
        ("pkg.a", False, 1, "b", "pkg.b"),
        ("pkg.a", False, 1, None, "pkg"),
        ("pkg.sub.a", False, 2, "b", "pkg.b"),
        ("pkg.sub.a", False, 2, None, "pkg"),
        ("pkg.sub", True, 1, "a", "pkg.sub.a"),
        ("pkg.sub", True, 2, "b", "pkg.b"),
        ("pkg", True, 1, None, "pkg"),
    ],
)
def test_relative_imports_resolve_as_python_does(
    module: str, is_package: bool, level: int, name: str | None, expected: str
) -> None:
    assert resolve(module, is_package, level, name) == expected


def test_a_relative_import_beyond_the_top_is_an_error() -> None:
    with pytest.raises(ValueError, match="beyond the top-level package"):
        resolve("pkg.a", False, 2, "b")


def test_imports_are_found_anywhere_and_name_the_module(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ..b import B\n"
        "    import swarmtools.x\n"
        "def later():\n"
        "    from . import d, e\n"
        "    import importlib\n"
        "    importlib.import_module('pkg.a')\n"
    )
    (pkg / "a.py").write_text("from .sub.c import C\n")
    (pkg / "b.py").write_text("from pkg.sub import c\n__import__('swarmtools')\n")
    (pkg / "sub" / "d.py").write_text("")
    found = {(i.module, i.target) for i in package_imports(pkg)}
    assert found == {
        ("pkg.sub", "pkg.a"),
        ("pkg.sub.c", "typing"),
        ("pkg.sub.c", "pkg.b"),
        ("pkg.sub.c", "swarmtools.x"),
        ("pkg.sub.c", "pkg.sub.d"),  # a module
        ("pkg.sub.c", "pkg.sub"),  # e: a name in pkg/sub/__init__.py
        ("pkg.sub.c", "importlib"),
        ("pkg.sub.c", "pkg.a"),
        ("pkg.a", "pkg.sub.c"),
        ("pkg.b", "pkg.sub.c"),
        ("pkg.b", "swarmtools"),
    }
    edges = graph(package_imports(pkg), "pkg")
    assert cycles(edges) == {
        ("pkg.a", "pkg.sub.c"),
        ("pkg.b", "pkg.sub.c"),
        ("pkg.a", "pkg.sub.c", "pkg.sub"),  # through the package's __init__
    }


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": set()}, set()),
        ({"a": {"a"}}, set()),  # a module naming itself is no cycle
        ({"a": {"b"}, "b": {"a"}}, {("a", "b")}),
        ({"b": {"c"}, "c": {"a"}, "a": {"b"}}, {("a", "b", "c")}),
        (
            {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a"}},
            {("a", "b"), ("a", "c"), ("a", "b", "c")},
        ),
        ({"a": {"b"}, "b": {"x"}}, set()),  # x: outside the package
    ],
)
def test_cycles_are_listed_once_each(
    edges: dict[str, set[str]], expected: set[tuple[str, ...]]
) -> None:
    assert cycles(edges) == expected
