"""The import contract: the folder layout's layers, read from the source (an AST walk, nothing run).

  * The rollout service's layers import only downwards: runtime < speculative < scheduler <
    draft_learning < service; and nothing below the service knows gRPC or protobuf, not even through
    another module.
  * The two services are independent: the learner never reaches the rollout service's code (it
    talks to it through fastgrpo.client), nor the fixture builder, which needs both.
  * The client needs no service; the wire format (fastgrpo.v1, fastgrpo.wire) and the shared
    helpers (fastgrpo.common) need nothing above them.
  * The speculative layer's pure math (controller formula, trees, verification, the knee, online
    refinement) needs no model code: it does not reach transformers.
  * No module imports itself back through others (no cycle).
Imports inside functions and under TYPE_CHECKING count like any other: a dependency is a dependency.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
ROOTS = ["proto/python", "common/python", "services/rollout", "services/learner", "clients/python", "fixture",
         "benchmarks"]
ROLLOUT_LAYERS = ["runtime", "speculative", "scheduler", "draft_learning", "service"]
WIRE_LIBRARIES = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "fastgrpo.v1")
PURE_MATH = tuple(f"fastgrpo.rollout.speculative.{m}" for m in ("controller", "tree", "verify", "knee",
                                                                 "online_calibration"))


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a fastgrpo module, or the top-level name of a library)
    where: str  # file:line


def discover() -> dict[str, Path]:
    """Module name -> file, for every module of the fastgrpo import root."""
    modules = {}
    for root in ROOTS:
        for path in (REPO / root / "fastgrpo").rglob("*.py"):
            parts = path.relative_to(REPO / root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in a module, resolved to the module it loads."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import submodule` loads the submodule
                sub = f"{base}.{alias.name}"
                out.append(Import(name, sub if sub in modules else base, where))
    return out


def graph() -> tuple[dict[str, Path], dict[str, list[Import]]]:
    modules = discover()
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def reaches(edges: dict[str, list[Import]], start: str) -> dict[str, list[Import]]:
    """Every module `start` loads, directly or through fastgrpo modules, with the chain that does."""
    chains: dict[str, list[Import]] = {}
    todo = [(start, [])]
    while todo:
        module, chain = todo.pop()
        for imp in edges.get(module, []):
            if imp.target not in chains:
                chains[imp.target] = chain + [imp]
                todo.append((imp.target, chain + [imp]))
    return chains


def is_within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rollout_layer(module: str) -> int | None:
    """Rank of a rollout module's layer (None outside the layers: the package's own entry points)."""
    if not is_within(module, "fastgrpo.rollout"):
        return None
    parts = module.split(".")
    return ROLLOUT_LAYERS.index(parts[2]) if len(parts) > 2 and parts[2] in ROLLOUT_LAYERS else None


def contract_violations(edges: dict[str, list[Import]]) -> list[str]:
    """What the module docstring forbids, one line each (file:line, importer -> imported: rule)."""
    bad = []

    def explain(imp: Import, rule: str, chain: list[Import] | None = None) -> None:
        via = " via " + " -> ".join(i.target for i in chain[:-1]) if chain and len(chain) > 1 else ""
        bad.append(f"{imp.where}: {imp.source} imports {chain[-1].target if chain else imp.target}{via}: {rule}")

    for module, imps in edges.items():
        rank = rollout_layer(module)
        for imp in imps:
            target_rank = rollout_layer(imp.target)
            if rank is not None and target_rank is not None and target_rank > rank:
                explain(imp, f"the {ROLLOUT_LAYERS[rank]} layer may not import the {ROLLOUT_LAYERS[target_rank]} "
                             "layer above it")
        reach = reaches(edges, module)
        forbidden: list[tuple[tuple[str, ...], str]] = []
        if rank is not None and ROLLOUT_LAYERS[rank] != "service":
            forbidden.append((WIRE_LIBRARIES, f"only the service layer knows gRPC and protobuf, not {ROLLOUT_LAYERS[rank]}"))
        if is_within(module, "fastgrpo.rollout"):
            forbidden.append((("fastgrpo.learner", "fastgrpo.client", "fastgrpo.fixture", "fastgrpo.bench"),
                              "the rollout service stands alone"))
        if is_within(module, "fastgrpo.learner"):
            forbidden.append((("fastgrpo.rollout", "fastgrpo.fixture", "fastgrpo.bench"),
                              "the learner reaches the rollout service only through fastgrpo.client"))
        if is_within(module, "fastgrpo.client"):
            forbidden.append((("fastgrpo.rollout", "fastgrpo.learner", "fastgrpo.fixture", "fastgrpo.bench"),
                              "the client needs no service"))
        if is_within(module, "fastgrpo.v1") or is_within(module, "fastgrpo.wire") or is_within(module, "fastgrpo.common"):
            forbidden.append((("fastgrpo.rollout", "fastgrpo.learner", "fastgrpo.client", "fastgrpo.fixture",
                               "fastgrpo.bench"), "the wire format and the shared helpers need nothing above them"))
        if is_within(module, "fastgrpo.common"):
            forbidden.append((("fastgrpo.v1",), "the shared helpers know no protobuf"))
        if module in PURE_MATH:
            forbidden.append((("transformers", "fastgrpo.rollout.runtime.model_runner"),
                              "the speculative layer's pure math loads no model code"))
        for prefixes, rule in forbidden:
            for target, chain in sorted(reach.items()):
                if any(is_within(target, p) for p in prefixes):
                    explain(chain[0], rule, chain)
    return bad


def cycles(edges: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected groups of two or more fastgrpo modules (and modules importing themselves)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for imp in edges.get(v, []):
            w = imp.target
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or any(i.target == v for i in edges[v]):
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_layout_has_the_layers_it_claims():
    modules = discover()
    for layer in ROLLOUT_LAYERS:
        assert f"fastgrpo.rollout.{layer}" in modules, f"no package fastgrpo.rollout.{layer}"
    assert sum(rollout_layer(m) is not None for m in modules) > 30  # every rollout module lives in a layer
    for name in ("fastgrpo.learner", "fastgrpo.client", "fastgrpo.fixture", "fastgrpo.common", "fastgrpo.wire"):
        assert any(is_within(m, name) for m in modules), name


def test_imports_follow_the_contract():
    _, edges = graph()
    bad = contract_violations(edges)
    assert not bad, "import contract broken:\n" + "\n".join(bad)


def test_no_import_cycles():
    _, edges = graph()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_contract_check_catches_what_it_forbids():
    """The checks above would see an upward import, a protobuf leak, a learner reaching the rollout
    code, and a cycle (added here to a copy of the real graph)."""
    _, edges = graph()
    runtime, sampler = "fastgrpo.rollout.runtime.model_runner", "fastgrpo.rollout.runtime.sampler"
    broken = {m: list(i) for m, i in edges.items()}
    broken[runtime].append(Import(runtime, "fastgrpo.rollout.scheduler.engine", "model_runner.py:1"))
    broken[sampler].append(Import(sampler, "fastgrpo.wire.convert", "sampler.py:1"))  # which loads protobuf
    broken["fastgrpo.learner.loop"].append(Import("fastgrpo.learner.loop", "fastgrpo.rollout.service.app", "loop.py:1"))
    bad = "\n".join(contract_violations(broken))
    assert "model_runner.py:1: fastgrpo.rollout.runtime.model_runner imports fastgrpo.rollout.scheduler.engine: " \
           "the runtime layer may not import the scheduler layer above it" in bad
    assert "sampler.py:1: fastgrpo.rollout.runtime.sampler imports fastgrpo.v1" in bad
    assert "only the service layer knows gRPC and protobuf, not runtime" in bad
    assert "loop.py:1: fastgrpo.learner.loop imports fastgrpo.rollout" in bad
    assert "the learner reaches the rollout service only through fastgrpo.client" in bad
    # model_runner -> scheduler.engine -> ... -> model_runner
    assert any(runtime in c and "fastgrpo.rollout.scheduler.engine" in c for c in cycles(broken))
