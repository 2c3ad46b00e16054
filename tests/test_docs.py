"""The docs a person reads stay true to the tree: README is short, and every local link, anchor, repository path
and ``python -m`` module that README.md and docs/*.md name exists."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"python3?\s+-m\s+([A-Za-z_][\w.]*)")
# top-level folders of the repository: a code span starting with one of them names a path in it
REPO_DIRS = ("agents", "baselines", "bench", "docs", "examples", "rudder", "rudder_env", "tests", "traces")
ENV_ID = re.compile(r"^rudder/[A-Z]\w*-v\d+$")  # a Gymnasium env id such as rudder/Replay-v0, not a path


def read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def anchors(page_path: str) -> set[str]:
    with open(page_path) as f:
        text = FENCE.sub("", f.read())
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def test_docs_pages_exist():
    names = {os.path.basename(p) for p in PAGES[1:]}
    assert {"index.md", "cluster.md", "environments.md", "agents.md", "evaluation.md", "reliability.md"} <= names


def test_readme_is_at_most_250_lines_and_keeps_the_ci_test_command():
    text = read("README.md")
    n = len(text.splitlines())
    assert n <= 250, f"README.md has {n} lines, expected <= 250: move detail into docs/"
    assert "python3 -m pytest -q" in text  # .ci/run runs the README's test command
    assert "bash install.sh" in text


@pytest.mark.parametrize("page", PAGES)
def test_every_local_link_resolves(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    bad = []
    for target in LINK.findall(FENCE.sub("", read(page))):
        if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(f"{target}: no {os.path.relpath(full, ROOT)}")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(full, ROOT)}")
    assert not bad, f"{page}: broken links: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_every_repository_path_named_exists(page):
    bad = []
    for span in CODE_SPAN.findall(FENCE.sub("", read(page))):
        span = span.strip()
        if " " in span or ENV_ID.match(span) or span.split("/")[0] not in REPO_DIRS or "/" not in span:
            continue
        path = span.split(":")[0]  # path/to/file.py:Class
        if not glob.glob(os.path.join(ROOT, path)):
            bad.append(path)
    assert not bad, f"{page}: paths that do not exist: {', '.join(bad)}"


@pytest.mark.parametrize("page", PAGES)
def test_every_python_m_module_named_is_importable(page):
    modules = sorted(set(MODULE.findall(read(page))))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"{page}: `python -m` modules that do not import: {', '.join(missing)}"


def test_the_checks_can_fail():
    """The patterns find what they are meant to: a link, an anchor, a path and a module each get caught."""
    text = "see [x](nope.md#a) and `traces/nope.py` and `python -m\nrudder.nope --x`\n```\n[y](skipped.md)\n```\n"
    body = FENCE.sub("", text)
    assert LINK.findall(body) == ["nope.md#a"]
    assert "traces/nope.py" in CODE_SPAN.findall(body)
    assert MODULE.findall(text) == ["rudder.nope"] and importlib.util.find_spec("rudder.nope") is None
    assert slug("Emulated hosts on one machine (`--hosts`)") == "emulated-hosts-on-one-machine---hosts"


def test_a_benchmark_run_keeps_the_summary_table_first(tmp_path):
    """``python -m rudder.bench`` rewrites BENCHMARKS.md section by section; the summary table stays at the top."""
    from rudder.bench.run import SECTIONS, _write

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(read("BENCHMARKS.md"))
    p4 = SECTIONS["p4"][0]
    _write(str(out), ["# rudder benchmarks", ""], {p4: f"## {p4}\n\nnew p4\n"})
    titles = [line for line in out.read_text().splitlines() if line.startswith("## ")]
    assert titles[0].startswith("## Summary"), titles[:3]
    assert "new p4" in out.read_text()
