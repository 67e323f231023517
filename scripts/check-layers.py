"""Checks that the router's modules depend on each other one way only.

Reads the dependency graph `cargo modules dependencies` prints (install it
with `cargo install cargo-modules --version 0.27.0 --locked`), folds every
item into the module that defines it, and fails on any cycle between the
coordinator's modules: at the top level (`registry`, `store`, ...) and
among the modules inside each of them (`api::forward`, `api::error`, ...).
cargo-modules sees `use` declarations and signatures but not paths written
inside function bodies, so every `crate::<module>` in the sources is added
too. Prints the top-level layers, lowest first."""

import pathlib
import re
import subprocess
import sys

output = subprocess.run(
    ["cargo", "modules", "dependencies", "--package", "coordinator", "--lib",
     "--no-externs", "--no-sysroot", "--no-owns"],
    check=True, capture_output=True, text=True,
).stdout

kinds = dict(re.findall(r'^\s*"([^"]+)" \[label="[^|]*?(mod|crate|struct|enum|fn|async fn|trait|type|const|static|union|macro)\|', output, re.M))
modules = {path for path, kind in kinds.items() if kind in ("mod", "crate")}


def module_of(path):
    """The module an item lives in (a module is its own)."""
    while path not in modules and "::" in path:
        path = path.rsplit("::", 1)[0]
    return path


edges = set()
for source, target in re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[label="uses"', output, re.M):
    a, b = module_of(source), module_of(target)
    if a != b:
        edges.add((a, b))


# Paths written in bodies: `crate::<module>` anywhere in a module's files.
source = pathlib.Path(__file__).resolve().parent.parent / "coordinator" / "src"
for file in source.rglob("*.rs"):
    relative = file.relative_to(source).with_suffix("")
    parts = [p for p in relative.parts if p not in ("mod", "lib", "main")]
    if not parts:
        continue
    here = "coordinator::" + "::".join(parts)
    for target in set(re.findall(r"\bcrate::([a-z_]+)", file.read_text())):
        there = "coordinator::" + target
        is_module = (source / f"{target}.rs").exists() or (source / target).is_dir()
        if is_module and not here.startswith(there):
            modules.add(there)
            modules.add(here)
            edges.add((here, there))


def cycles(nodes, edges):
    """Strongly connected components of more than one node (Tarjan)."""
    graph = {n: [] for n in nodes}
    for a, b in edges:
        graph[a].append(b)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return found


def level(path, depth):
    parts = path.split("::")
    return "::".join(parts[: depth + 1])


failed = False
# Top level: every module below the crate root, folded to its first segment.
top_edges = {(level(a, 1), level(b, 1)) for a, b in edges
             if a.count("::") >= 1 and b.count("::") >= 1 and level(a, 1) != level(b, 1)}
top_nodes = {n for edge in top_edges for n in edge}
for component in cycles(top_nodes, top_edges):
    print("cycle between modules:", " <-> ".join(component))
    failed = True
# Inside each top-level module: its children, folded to their first segment.
for parent in sorted(top_nodes):
    inner = {(level(a, 2), level(b, 2)) for a, b in edges
             if a.startswith(parent + "::") and b.startswith(parent + "::")
             and a.count("::") >= 2 and b.count("::") >= 2 and level(a, 2) != level(b, 2)}
    nodes = {n for edge in inner for n in edge}
    for component in cycles(nodes, inner):
        print("cycle inside", parent + ":", " <-> ".join(component))
        failed = True

if failed:
    sys.exit(1)
# The layers, lowest first: each uses only those printed before it.
remaining, order = set(top_nodes), []
while remaining:
    ready = sorted(n for n in remaining
                   if not any(a == n and b in remaining for a, b in top_edges))
    order.append(ready)
    remaining -= set(ready)
for depth, layer in enumerate(order):
    print(f"layer {depth}:", ", ".join(name.split("::", 1)[1] for name in layer))
print("no cycle between the coordinator's modules")
