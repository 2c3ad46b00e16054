"""The benchmark report: a run replaces only the sections it measured and keeps the rest as the file has it."""

from rudder.bench.run import SECTIONS, _write


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


def test_p1_leaves_out_a_learned_agents_rows_on_traces_it_was_not_held_out_from():
    import pandas as pd
    from rudder.bench.traffic import summarise

    rows = []
    for seed in (0, 1):  # seed 0: the learned agent's own training run, by content
        for agent, fetched, not_held_out in (
            ("none", 1000, 0),
            ("belady", 500, 0),
            ("periodic", 700, 0),
            ("ppo", 600, int(seed == 0)),
        ):
            rows.append(
                dict(
                    graph="g",
                    parts=2,
                    fanout="10,25",
                    seed=seed,
                    fraction=0.25,
                    agent=agent,
                    remote_sampled=1000,
                    hits=0,
                    remote_fetched=fetched - 100 * (seed == 0) * (agent == "ppo"),
                    not_held_out=not_held_out,
                )
            )
    df = pd.DataFrame(rows)
    df["fetched_vs_min"] = df["remote_fetched"] / 500
    df["fetched_vs_none"] = df["remote_fetched"] / 1000
    text, table = summarise(df)
    ppo = table[table["agent"] == "ppo"].iloc[0]
    assert ppo["traces"] == 1 and ppo["fetched_vs_min_mean"] == 1.2  # the seed-1 trace only: not its own run's 1.0
    assert "Left out, not held out by content: ppo on 1 trace x fraction pair(s)." in text
    text, _ = summarise(df.assign(not_held_out=0))
    assert "No pair was left out" in text


def test_reliability_counts_the_fuzz_loop_apart_and_derives_silent_changes_from_the_tests_checks():
    import pandas as pd
    from rudder.bench.faults import summarise

    def row(fault, tried, detected, clean=0, detect_s=1.0):
        return dict(
            fault=fault,
            injected="x",
            detect_s=detect_s,
            left="nothing",
            seen="y",
            tried=tried,
            detected=detected,
            clean=clean,
            lost_bytes=0,
            input_checked=10,
        )

    rows = [
        row("killed trainer", 1, 1),
        row("damaged trace (fuzz)", 400, 371, clean=29),
        row("link rate cut", 1, 0, detect_s=None),
    ]
    text, _ = summarise(pd.DataFrame(rows))
    assert "2 kinds of fault, 2 injected in 2 tests: 1 ended in an error" in text
    assert (
        "400 damaged trace chunks (a seeded fuzz loop and single cases): 371 refused naming the chunk, 29 read" in text
    )
    assert text.count("): 0.") == 1  # silent changes: none
    # a fault its test neither saw reported nor checked to leave the data as it was is counted as silent
    text, _ = summarise(pd.DataFrame([*rows, row("truncated partition file", 3, 2)]))
    assert "the data as it was): 1." in text
