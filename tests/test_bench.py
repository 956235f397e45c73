"""`unlearn bench` on the fixture: every run uses the same settings, the table and the
Fig. 3 plot are written, and the numbers in them are the runs' own metrics."""

from __future__ import annotations

import json

from core.demo.bench import BenchRun, grid, run_bench
from core.demo.build import demo_spec


def test_grid_names_and_retain_variants():
    runs = grid(["catnip", "npo", "rmu"], [None, 1e-4], retain_lr=3e-4, sam_methods=["catnip"])
    assert [r.name for r in runs] == [
        "catnip@paper",
        "catnip@0.0001",
        "npo@paper",
        "npo@0.0001",
        "rmu@paper",
        "rmu@0.0001",
        "catnip+sam0.05@0.0001",  # beside catnip@0.0001, the same but for SAM
        "catnip+kl@0.0003",
        "npo+kl@0.0003",
    ]  # no rmu+kl: RMU's retain term is its own


def test_bench_writes_table_plot_and_the_runs_metrics(fixture_dir, tmp_path):
    base = demo_spec(fixture_dir, max_steps=2)
    base["hyperparameters"]["batch_size"] = 16
    base["eval"].update(max_samples=40, probe_samples=20)
    runs = [
        BenchRun("catnip", 1e-2),
        BenchRun("ga", None, "kl"),
        BenchRun("flat", 1e-2),
        BenchRun("rmu", None),
        BenchRun("catnip", 1e-2, sam_rho=0.05),
    ]
    lines: list[str] = []
    rows = run_bench(fixture_dir, tmp_path, base, runs, device="cpu", echo=lines.append)
    assert [r["run"] for r in rows] == [
        "catnip@0.01",
        "ga+kl@paper",
        "flat@0.01",
        "rmu@paper",
        "catnip+sam0.05@0.01",
    ]
    assert rows[1]["learning_rate"] == 3e-5  # GA's paper default (A.4.4)
    assert rows[3]["learning_rate"] == 5e-5  # RMU's official default
    assert [r["data"] for r in rows] == [
        "forget",
        "forget + retain",
        "forget + contrast",
        "forget + retain",
        "forget",
    ]
    sam = json.loads((tmp_path / "runs" / "catnip+sam0.05@0.01" / "metrics.json").read_text())
    assert sam["hyperparameters"]["sam_rho"] == 0.05 and rows[4]["sam_rho"] == 0.05
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
    flat = json.loads((tmp_path / "runs" / "flat@0.01" / "metrics.json").read_text())
    assert flat["data"]["contrast"]["source"] == "contrast_file"
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| catnip@0.01 | forget |") == 1 and "| ga+kl@paper |" in table
    assert "| rmu@paper | forget + retain | 5e-05 |" in table
    # The reference model under the same attacks: what fine-tuning on 20 forget answers
    # teaches a model that never saw them (the test_evidence relearning test: < 0.5).
    reference = next(line for line in table.splitlines() if line.startswith("| reference"))
    cells = [c.strip() for c in reference.strip("|").split("|")]
    recovery, four_bits = float(cells[12]), float(cells[13])
    assert 0 <= recovery < 0.5 and four_bits < 10, reference
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert len(lines) == 5


def test_unlearn_bench_gives_every_run_its_settings(monkeypatch, tmp_path):
    """`unlearn bench --steps --batch-size --forget-target` reach the spec every run starts
    from; a forget target outside [0, 1] is refused before anything runs."""
    from typer.testing import CliRunner

    import core.demo.bench as bench
    import core.demo.build as build
    from core.cli import app

    monkeypatch.setenv("UNLEARN_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(build, "ensure_model", lambda *args, **kwargs: None)
    seen: dict = {}

    def run_bench(demo_dir, out, base, runs, **kwargs):
        seen.update(base=base, runs=runs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("the table")

    monkeypatch.setattr(bench, "run_bench", run_bench)
    options = ["bench", "--methods", "catnip", "--lrs", "1e-4", "--retain-lr", "1e-4"]
    options += ["--sam-methods", "none", "--steps", "7", "--batch-size", "16"]
    result = CliRunner().invoke(app, [*options, "--forget-target", "0"])
    assert result.exit_code == 0 and "the table" in result.output, result.output
    assert seen["base"]["eval"]["forget_target"] == 0
    assert seen["base"]["hyperparameters"]["max_steps"] == 7
    assert seen["base"]["hyperparameters"]["batch_size"] == 16
    assert [run.name for run in seen["runs"]] == ["catnip@0.0001", "catnip+kl@0.0001"]
    seen.clear()
    default = CliRunner().invoke(app, options)
    assert default.exit_code == 0 and seen["base"]["eval"]["forget_target"] == 0.1
    refused = CliRunner().invoke(app, [*options, "--forget-target", "1.5"])
    assert refused.exit_code == 2 and "forget-target" in refused.output
