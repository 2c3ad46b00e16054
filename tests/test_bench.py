"""The benchmark report: a run replaces only the sections it measured and keeps the rest as the file has it."""

from bench.run import SECTIONS, _write


def test_report_keeps_sections_it_did_not_run_including_edits_made_meanwhile(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    p1, p4 = SECTIONS["p1"][0], SECTIONS["p4"][0]
    out.write_text(f"# old header\n\n## {p4}\n\nold p4\n\n## {p1}\n\nold p1\n\n## Targets\n\nwritten by hand\n")
    _write(str(out), ["# rudder benchmarks", ""], {p1: f"## {p1}\n\nnew p1\n"})
    text = out.read_text()
    assert "new p1" in text and "old p1" not in text
    assert "old p4" in text and "written by hand" in text
    assert text.index(p1) < text.index(p4) < text.index("## Targets")  # sections in the benchmark's order
    assert text.startswith("# rudder benchmarks")
