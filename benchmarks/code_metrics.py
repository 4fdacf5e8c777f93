"""The package's shape in numbers: modules per package, import levels, circles, the longest
function, broad ``except`` sites, and provenance noise (commit hashes, "issue N") in the docs.

    python benchmarks/code_metrics.py               # this checkout
    python benchmarks/code_metrics.py --rev HEAD~5  # a past commit (read with git show)

Import levels are the longest chain of intra-package imports (function-level imports count,
``TYPE_CHECKING`` imports do not); a circle is a strongly connected group of two or more modules.
"""
from __future__ import annotations

import argparse
import ast
import collections
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PKG = "sct_convert"


def read_tree(rev: str | None) -> Dict[str, str]:
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / PKG).rglob("*.py")}
    names = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", rev, PKG], cwd=ROOT, text=True).split()
    return {n: subprocess.check_output(["git", "show", f"{rev}:{n}"], cwd=ROOT, text=True)
            for n in names if n.endswith(".py")}


def module_name(path: str) -> str:
    parts = path[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(name: str, is_pkg: bool, tree: ast.AST, modules: Set[str]) -> Set[str]:
    out: Set[str] = set()
    skip: Set[int] = set()
    for node in ast.walk(tree):  # TYPE_CHECKING blocks do not run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                target = full if full in modules else mod
                if target in modules:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    out.discard(name)
    return out


def sccs(graph: Dict[str, Set[str]]) -> List[List[str]]:
    index, low, stack, on, result, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            result.append(group)

    for v in graph:
        if v not in index:
            visit(v)
    return result


def _longest(graph: Dict[str, Set[str]]) -> int:
    memo: Dict[str, int] = {}

    def depth(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((depth(w) for w in graph[v]), default=0)
        return memo[v]

    return max(depth(v) for v in graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    args = parser.parse_args()
    files = read_tree(args.rev)
    trees = {module_name(p): (p.endswith("__init__.py"), ast.parse(src)) for p, src in files.items()}
    modules = set(trees)
    graph = {m: imports_of(m, is_pkg, t, modules) - {PKG} for m, (is_pkg, t) in trees.items()}
    circles = [g for g in sccs(graph) if len(g) > 1]
    inside = set().union(*circles) if circles else set()
    level: Dict[str, int] = {}

    def depth(m: str, seen: frozenset = frozenset()) -> int:
        if m in level:
            return level[m]
        nxt = [d for d in graph[m] if d not in seen and d not in inside]
        level[m] = 1 + max((depth(d, seen | {m}) for d in nxt), default=0)
        return level[m]

    levels = max(depth(m) for m in graph if m != PKG)
    per_pkg = collections.Counter(m.rsplit(".", 1)[0] if "." in m else m for m, (p, _) in trees.items() if not p)
    longest, where = 0, ""
    broad = 0
    for m, (_, t) in trees.items():
        for node in ast.walk(t):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > longest:
                    longest, where = n, f"{m}.{node.name}"
            if isinstance(node, ast.ExceptHandler):
                names = [] if node.type is None else [ast.unparse(e) for e in (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type])]
                if node.type is None or {"Exception", "BaseException"} & set(names):
                    broad += 1
    print(f"modules: {sum(per_pkg.values())}")
    for pkg, n in sorted(per_pkg.items()):
        print(f"  {pkg:28s} {n}")
    stage = lambda m: ".".join(m.split(".")[:2])  # noqa: E731 - sct_convert.<stage>
    stages = {stage(m) for m in graph if m != PKG}
    stage_graph = {s: {stage(d) for m in graph if stage(m) == s for d in graph[m]} - {s, PKG} for s in stages}
    stage_circles = [g for g in sccs(stage_graph) if len(g) > 1]
    print(f"import levels: {levels} between modules"
          + ("" if stage_circles or len(stages) > 30 else f", {_longest(stage_graph)} between stages (subpackages)"))
    print(f"circles: {len(circles)} {[sorted(c) for c in circles]}")
    print(f"longest function: {longest} lines ({where})")
    print(f"broad except sites: {broad}")
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if args.rev is None else []
    hashes = issues = 0
    for doc in docs:
        text = doc.read_text()
        hashes += len(re.findall(r"(?<![\w/.#-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])", text))
        issues += len(re.findall(r"\bissues? \d+", text, flags=re.I))
    if docs:
        print(f"docs: {hashes} commit hashes, {issues} 'issue N' mentions (README.md and docs/)")


if __name__ == "__main__":
    main()
