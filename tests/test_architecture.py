"""The package layers import one way, with no cycle, counting imports inside functions too; the folders are the layers.

Layers, lowest first: the trace format (``rudder.traces``, ``traces/``) <- the environment core (``rudder.env``,
``rudder_env/``) <- the agent contract (``rudder.agents.base``) <- policies (``rudder.baselines``, ``rudder.agents``)
<- evaluation (``rudder.evaluation``) <- the emulated-cluster testbed (``rudder.testbed``) <- the DistDGL runtime
(``rudder.runtime``) <- entry points (``rudder.train``, ``rudder.evaluate``, ``rudder.cli``, ``rudder.bench``). A
module may import its own layer and the layers below it; within the policy layer ``baselines`` and ``agents`` do not
import each other (except the contract).
"""

from __future__ import annotations

import ast
import os

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = [  # (name, prefixes), lowest first; the longest matching prefix decides
    ("traces", ("rudder.traces",)),
    ("env core", ("rudder.env",)),
    ("agent contract", ("rudder.agents.base",)),
    ("policies", ("rudder.agents", "rudder.baselines")),
    ("evaluation", ("rudder.evaluation",)),
    ("testbed", ("rudder.testbed",)),
    ("runtime", ("rudder.runtime",)),
    ("entry points", ("rudder", "rudder.train", "rudder.evaluate", "rudder.cli", "rudder.bench")),
]


def package_folders() -> dict[str, str]:
    """Each installed package -> its folder, as pyproject.toml maps them (what ``pip install`` installs)."""
    conf = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    mapped = conf.get("package-dir", {})
    out = {}
    for pkg in conf["packages"]:
        parent = max((m for m in mapped if pkg == m or pkg.startswith(m + ".")), key=len, default=None)
        rel = (
            pkg.replace(".", os.sep)
            if parent is None
            else os.path.join(mapped[parent], *pkg[len(parent) + 1 :].split(".") if pkg != parent else [])
        )
        out[pkg] = os.path.join(ROOT, rel)
    return out


def modules() -> dict[str, str]:
    """Every first-party module name -> its file: the packages' own modules, not their subpackages' folders."""
    out = {}
    folders = package_folders()
    for pkg, folder in folders.items():
        for f in os.listdir(folder):
            if f.endswith(".py"):
                out[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(folder, f)
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
            # ``from pkg import mod`` depends on pkg.mod (a module) or on pkg (a name defined there)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
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
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in graph().items()
        for dep in deps
        if (mod.startswith("rudder.baselines") and dep.startswith("rudder.agents") and dep != "rudder.agents.base")
        or (mod.startswith("rudder.agents") and dep.startswith("rudder.baselines"))
    ]
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
    src.write_text("def f():\n    from rudder.evaluation import play\n")
    deps = imports_of(str(src), "rudder.env.buffer", {"rudder.evaluation", "rudder.evaluation.play"})
    assert deps == {"rudder.evaluation.play"}
    assert layer("rudder.evaluation.play") > layer("rudder.env.buffer")
    assert layer("rudder.agents.base") < layer("rudder.agents.ppo") and layer("rudder.runtime.rank") > layer(
        "rudder.agents.llm.agent"
    )


def test_every_folder_is_one_package_of_one_layer():
    """The tree and the layer list agree: each installed package's folder exists, holds its own ``__init__.py`` and
    falls in one layer; no Python file of the source folders lies outside an installed package; no source folder is
    named like build output (``dist``, ``build``: tools such as ruff skip those by default)."""
    folders = package_folders()
    for pkg, folder in folders.items():
        assert os.path.isfile(os.path.join(folder, "__init__.py")), f"{pkg}: no {folder}/__init__.py"
        layer(pkg)
    packaged = {os.path.realpath(f) for f in folders.values()}
    stray, build_like = [], []
    for top in {os.path.relpath(f, ROOT).split(os.sep)[0] for f in folders.values()}:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            build_like += [os.path.join(folder, d) for d in dirs if d in ("dist", "build")]
            if any(f.endswith(".py") for f in files) and os.path.realpath(folder) not in packaged:
                stray.append(os.path.relpath(folder, ROOT))
    assert not stray, f"Python files outside any installed package (pyproject.toml): {stray}"
    assert not build_like, f"source folders named like build output: {build_like}"
