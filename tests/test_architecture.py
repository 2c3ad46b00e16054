"""The package layers import one way, with no cycle, counting imports inside functions too.

Layers, lowest first: ``traces`` <- the environment core (``rudder_env``) <- the agent contract (``agents.base``)
<- policies (``baselines``, ``agents``) <- evaluation (``rudder_env.evaluation``) <- the DistDGL runtime
(``rudder_env.dist``) <- entry points (``train``, ``evaluate``, ``bench``, ``rudder_cli``). A module may import its
own layer and the layers below it; within the policy layer ``baselines`` and ``agents`` do not import each other
(except the contract).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("traces", "rudder_env", "agents", "baselines", "bench")
SCRIPTS = ("train", "evaluate", "rudder_cli")

LAYERS = [  # (name, prefixes), lowest first; the longest matching prefix decides
    ("traces", ("traces",)),
    ("env core", ("rudder_env",)),
    ("agent contract", ("agents.base",)),
    ("policies", ("agents", "baselines")),
    ("evaluation", ("rudder_env.evaluation",)),
    ("runtime", ("rudder_env.dist",)),
    ("entry points", ("train", "evaluate", "bench", "rudder_cli")),
]


def modules() -> dict[str, str]:
    """Every first-party module name -> its file."""
    out = {name: os.path.join(ROOT, name + ".py") for name in SCRIPTS}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def imports_of(path: str, name: str, known: set[str]) -> set[str]:
    """First-party modules imported anywhere in the file (module level or inside functions)."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def test_imports_point_down_the_layers():
    upward = []
    for mod, deps in graph().items():
        for dep in deps:
            if layer(dep) > layer(mod):
                upward.append(f"{mod} ({LAYERS[layer(mod)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_baselines_and_agents_do_not_import_each_other():
    wrong = [f"{mod} imports {dep}" for mod, deps in graph().items() for dep in deps
             if (mod.startswith("baselines") and dep.startswith("agents") and dep != "agents.base")
             or (mod.startswith("agents") and dep.startswith("baselines"))]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_function_level_and_upward_imports(tmp_path):
    """The checker itself: an import inside a function counts, and an upward one is named."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from rudder_env.evaluation import play\n")
    deps = imports_of(str(src), "rudder_env.buffer", {"rudder_env.evaluation", "rudder_env.evaluation.play"})
    assert deps == {"rudder_env.evaluation", "rudder_env.evaluation.play"}
    assert layer("rudder_env.evaluation.play") > layer("rudder_env.buffer")
    assert layer("agents.base") < layer("agents.ppo") and layer("rudder_env.dist.rank") > layer("agents.llm")
