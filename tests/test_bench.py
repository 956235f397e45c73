"""`unlearn bench` on the fixture: every run uses the same settings, the table and the
Fig. 3 plot are written, and the numbers in them are the runs' own metrics."""

from __future__ import annotations

import json

from core.demo.bench import BenchRun, grid, run_bench
from core.demo.build import demo_spec


def test_grid_names_and_retain_variants():
    runs = grid(["catnip", "npo"], [None, 1e-4], retain_lr=3e-4)
    assert [r.name for r in runs] == [
        "catnip@paper",
        "catnip@0.0001",
        "npo@paper",
        "npo@0.0001",
        "catnip+kl@0.0003",
        "npo+kl@0.0003",
    ]


def test_bench_writes_table_plot_and_the_runs_metrics(fixture_dir, tmp_path):
    base = demo_spec(fixture_dir, max_steps=2)
    base["hyperparameters"]["batch_size"] = 16
    base["eval"].update(max_samples=40, probe_samples=20)
    runs = [BenchRun("catnip", 1e-2), BenchRun("ga", None, "kl")]
    lines: list[str] = []
    rows = run_bench(fixture_dir, tmp_path, base, runs, device="cpu", echo=lines.append)
    assert [r["run"] for r in rows] == ["catnip@0.01", "ga+kl@paper"]
    assert rows[1]["learning_rate"] == 3e-5  # GA's paper default (A.4.4)
    for r, run in zip(rows, runs, strict=True):
        metrics = json.loads((tmp_path / "runs" / run.name / "metrics.json").read_text())
        assert r["forget_f1"] == 100 * metrics["after"]["forget_knowmem"]["rouge_l_f1"]
        assert r["delta_o"] == metrics["tradeoff"]["delta_o"]
        assert r["forget_f1_before"] > 90
        # The stop rule watched the first 20 retain questions; the next 40 are reported apart.
        unwatched = metrics["after"]["retain_knowmem_unwatched"]
        assert unwatched["n"] == 40 and r["retain_unwatched_f1"] == 100 * unwatched["rouge_l_f1"]
    assert (
        json.loads((tmp_path / "runs" / "ga+kl@paper" / "metrics.json").read_text())[
            "hyperparameters"
        ]["retain_loss"]
        == "kl"
    )
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| catnip@0.01 |") == 1 and "| ga+kl@paper |" in table
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert len(lines) == 2
