"""Fail if any of our modules import each other in a cycle, directly or through others.

import-linter's contracts (setup.cfg) see packages; this sees modules: ``a.x -> a.y -> a.x``
inside one package counts as much as a cycle across packages. Imports under ``TYPE_CHECKING``
count too, as they do for the contracts. The packages are ``[importlinter] root_packages``.
Run from the repository root (scripts/check-imports does).
"""

from __future__ import annotations

import configparser
import itertools
import sys
from collections import deque

import grimp


def root_packages() -> list[str]:
    config = configparser.ConfigParser()
    config.read("setup.cfg")
    return config["importlinter"]["root_packages"].split()


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """The groups of two or more modules that reach each other (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, imported = work[-1]
            for target in imported:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.find_modules_directly_imported_by(target)))))
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == module:
                            break
                    if len(group) > 1:
                        groups.append(group)
    return groups


def one_cycle(graph: grimp.ImportGraph, group: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``group``, as the list of modules in order."""
    start = min(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph.find_modules_directly_imported_by(module) & group):
            if target == start:
                path = [module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if target not in came_from:
                came_from[target] = module
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    hops = []
    for importer, imported in itertools.pairwise(cycle):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = f" (l.{min(d['line_number'] for d in details)})" if details else ""
        hops.append(f"    {importer} -> {imported}{where}")
    return "\n".join(hops)


def main() -> int:
    packages = root_packages()
    graph = grimp.build_graph(*packages, cache_dir=None)
    groups = strongly_connected(graph)
    for group in groups:
        print(f"import cycle among {len(group)} modules, for instance:\n{describe(graph, one_cycle(graph, group))}")
    if groups:
        print(f"scripts/check-imports: {len(groups)} import cycle(s)", file=sys.stderr)
        return 1
    print(f"no import cycle among the modules of {', '.join(packages)} ({len(graph.modules)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
