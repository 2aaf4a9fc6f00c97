"""The package's layers, as a contract the unit suite checks (issue 24).

Every import of ``slurm_dgxvm`` by ``slurm_dgxvm`` is read from the source with :mod:`ast`: those at
the top of a module, those inside functions (a lazy ``from ..x import y`` is still a dependency),
and those under ``TYPE_CHECKING``. Each module belongs to a *unit*: its top-level package
(``lifecycle``, ``containers``, ...) or, for a loose module, itself (``ledger``, ``config``, ...).
The units are stacked in :data:`LAYERS`, top first; a unit imports only units of its own layer or
below, and no import cycle runs between units. Besides: no private name (``_x``) is imported from
another module (make it public, or move it), no module is over :data:`MAX_LINES` lines, no verb
module of ``cli`` imports another (they share only :data:`CLI_SHARED`), and no two modules of a
folder differ by a suffix (``reconcile`` beside ``reconciler``).

Why the layers are cut where they are (the rest follows the imports the code needs):

* ``cli`` holds the verbs only; whatever a verb needs from another unit is below it.
* ``slurm`` (hooks, job input, accounting, report, commands) drives the VM lifecycle for a job.
* ``access`` (``dgxvm run``: into a job's VM) reaches the VM through the lifecycle's ``Env`` and
  runs containers; it needs the job's domain name, which is the lifecycle's (``identity``).
* ``host`` (``dgxvm host check|setup|revert``) asks the lifecycle's ``Env`` and the health
  checks whether libvirt and Fabric Manager answer; gres.conf is rendered by ``topology.gres``.
* ``reconcile`` sits above ``lifecycle`` and ``containers``: it deletes VMs through the
  lifecycle (under its locks) and sweeps the users' container image caches.
* ``lifecycle`` never imports ``containers``: what a VM's create needs of the image cache (the
  user's cache directory, the ranlog's file name) is ``lifecycle.cachedir`` and ``records``.
* ``health`` is the devices' health (probe, policy, reset, the quarantine record), which the
  lifecycle runs after every VM. The node's checks ``dgxvm health`` runs read the node through
  the lifecycle's ``Env`` and its VM locks, so they are ``host.node_health``, above the lifecycle.
* ``virt`` (``hypervisor``, ``guest``) renders domains with ``design``; ``observe`` (stages,
  opstats, metrics) is what the lifecycle and the Slurm side count and time with.
* ``preload`` is loaded only by verbs; ``netfilter`` sits at the bottom because ``config`` parses
  its host service names.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "slurm_dgxvm"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE
MAX_LINES = 700

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("preload",),
    ("slurm",),
    ("access",),
    ("host",),
    ("reconcile",),
    ("lifecycle",),
    ("health",),
    ("virt",),
    ("design",),
    ("containers",),
    ("shares",),
    ("placement", "topology", "simulate", "ledger", "records", "images", "seed", "fabric",
     "ibpart", "observe", "failpoints", "jobnet"),
    ("config", "errors", "fsutil", "tools", "names", "ranges", "netfilter", "lazy",
     "versions"),
)
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
# Said on their own too, so that a change to LAYERS cannot drop them unnoticed.
FORBIDDEN = {("lifecycle", "containers"), ("lifecycle", "access"), ("lifecycle", "slurm"),
             ("host", "slurm"), ("config", "containers")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path):
    """(line, imported module, imported name or None) for every import of the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:             # a submodule: the dependency is on it
                    yield node.lineno, full, None
                else:
                    yield node.lineno, target, alias.name


IMPORTS = {m: list(_imports(m, p)) for m, p in MODULES.items()}


def unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def _unit_edges() -> dict[tuple[str, str], list[str]]:
    edges = defaultdict(list)
    for module, imports in IMPORTS.items():
        for line, target, _ in imports:
            a, b = unit(module), unit(target)
            if a is not None and b is not None and a != b:
                edges[a, b].append(f"{_where(module, line)} imports {target}")
    return edges


EDGES = _unit_edges()


def test_every_unit_has_a_layer():
    units = {unit(m) for m in MODULES} - {None}
    assert sorted(units - set(LAYER_OF)) == [], "add the new unit to LAYERS in this test"
    assert sorted(set(LAYER_OF) - units) == [], "LAYERS names a unit that no longer exists"


def test_each_unit_imports_only_its_layer_and_below():
    up = [f"{a} (layer {LAYER_OF[a]}) -> {b} (layer {LAYER_OF[b]}): {where[0]}"
          for (a, b), where in sorted(EDGES.items()) if LAYER_OF[b] < LAYER_OF[a]]
    assert up == []


@pytest.mark.parametrize(("importer", "imported"), sorted(FORBIDDEN))
def test_forbidden_imports(importer, imported):
    assert EDGES.get((importer, imported), []) == []


def test_no_import_cycle_between_units():
    graph = defaultdict(set)
    for a, b in EDGES:
        graph[a].add(b)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                cycles.append(" -> ".join(cycle) + ": "
                              + "; ".join(EDGES[x, y][0] for x, y in zip(cycle, cycle[1:])))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{_where(m, line)}: {name} from {target}"
               for m, imports in IMPORTS.items() for line, target, name in imports
               if name is not None and name.startswith("_") and not name.startswith("__")
               and target != m]
    assert private == []


def test_no_module_is_over_the_size_limit():
    big = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    # the checks above are only as good as what _imports finds
    found = {(t, n) for _, t, n in IMPORTS[f"{PACKAGE}.reconcile.cache_partials"]}
    assert (f"{PACKAGE}.containers.cache", "ImageCache") in found     # inside sweep()
    found = {(t, n) for _, t, n in IMPORTS[f"{PACKAGE}.lifecycle"]}
    assert (f"{PACKAGE}.lazy", "lazy_exports") in found               # from ..lazy, in __init__


#: what the verb modules of cli/ share; a verb module imports no other verb module
CLI_SHARED = {"context", "params", "render"}


def test_no_cli_verb_module_imports_another():
    cli = f"{PACKAGE}.cli"
    verbs = {m for m in MODULES if m.startswith(cli + ".")
             and m.rsplit(".", 1)[1] not in CLI_SHARED | {"main"}}
    assert verbs, "the verb modules of cli/"
    crossed = [f"{_where(m, line)} imports {target}"
               for m in sorted(verbs | {f"{cli}.main"}) for line, target, _ in IMPORTS[m]
               if target in verbs and target != m]
    assert crossed == []


def test_no_two_modules_of_a_folder_differ_by_a_suffix():
    """reconcile beside reconciler, record beside records: two names a reader cannot tell apart."""
    by_folder = defaultdict(set)
    for m in MODULES:
        folder, _, name = m.rpartition(".")
        by_folder[folder].add(name)
    alike = [f"{folder}: {a} / {b}" for folder, names in sorted(by_folder.items())
             for a in sorted(names) for b in sorted(names)
             if a != b and b.startswith(a) and b[len(a):] in {"s", "r", "er", "ing", "ion", "_"}]
    assert alike == []
