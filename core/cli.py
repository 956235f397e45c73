"""The `unlearn` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer
from tqdm import tqdm

from core.engine.events import Events, Phase, StepInfo
from core.engine.runtime import quiet_libraries, set_loss_backend
from core.errors import UnlearnError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Remove specific knowledge from a language model (CATNIP and baselines).",
)


def _data_dir() -> Path:
    return Path(os.environ.get("UNLEARN_DATA_DIR", ".unlearn")).resolve()


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()


class ConsoleEvents(Events):
    """A job's events on the terminal: phases and warnings as lines, steps as a progress
    bar, probes written above it."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def phase(self, name: str, detail: str | None = None) -> None:
        if self.bar is not None and name != Phase.UNLEARNING:
            self.bar.close()
            self.bar = None
        typer.echo(f"[{name}]" + (f" {detail}" if detail else ""), err=True)

    def step(self, info: StepInfo) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=info.total_steps,
                initial=info.step - 1,
                unit="step",
                dynamic_ncols=True,
                # the ETA is the run's own (info.eta_seconds), not tqdm's from the step bound
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
            )
        self.bar.update(info.step - self.bar.n)
        eta = info.eta_seconds
        self.bar.set_postfix(
            {
                "loss": f"{info.loss:.4f}",
                "lr": f"{info.learning_rate:.1e}",
                "tok_s": f"{info.tokens_per_second:.0f}",
                "eta": "?" if eta is None else tqdm.format_interval(eta),
            }
        )

    def probe(self, step: int, result: dict[str, float]) -> None:
        scores = " ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "step")
        message = f"probe @ {step}: {scores}"
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            typer.echo(message, err=True)

    def warning(self, message: str) -> None:
        typer.echo(f"[warning] {message}", err=True)

    def resumed(self, step: int) -> None:
        typer.echo(f"[resumed] from the checkpoint at step {step}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_table(metrics: dict) -> None:
    """The before/after table (with the reference model's column where one was measured),
    the trade-off, and the evidence: attacks, membership inference, the verdict."""
    import textwrap

    from core.engine.evaluation.summary import before_after_rows, evidence_lines, headline

    lead = headline(metrics)
    if lead:
        typer.echo("\n" + textwrap.fill(lead, width=100, subsequent_indent="  "))
    rows = before_after_rows(metrics)
    if rows:
        width = max(len(r[0]) for r in rows)
        reference = bool(metrics.get("reference"))
        typer.echo(
            f"\n{'metric'.ljust(width)}  {'before':>8}  {'after':>8}"
            + (f"  {'reference':>9}" if reference else "")
        )
        for name, before, after, ref in rows:
            typer.echo(
                f"{name.ljust(width)}  {before:>8}  {after:>8}"
                + (f"  {ref:>9}" if reference else "")
            )
    t = metrics.get("tradeoff")
    if t and t["delta_o"] is not None:
        typer.echo(
            f"\ndelta f = {t['delta_f']:.2f}  delta u = {t['delta_u']:.2f}  "
            f"dO = {t['delta_o']:.2f} (points)"
        )
    for line in evidence_lines(metrics):
        typer.echo("\n" + textwrap.fill(line.replace("**", ""), width=100, subsequent_indent="  "))


@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Job spec, YAML or JSON."),
    output: Path = typer.Option(Path("out"), "--output", "-o", help="Where outputs go."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if present)."),
    resume: bool = typer.Option(True, help="Resume from checkpoints in OUTPUT/checkpoints."),
    loss_backend: str = typer.Option(
        "auto",
        help="auto (triton on CUDA, else eager), eager, "
        "compiled (torch.compile: a one-off compilation) or triton "
        "(fused CUDA kernels).",
    ),
) -> None:
    """Run one job without the service (same spec as POST /v1/jobs, local paths)."""
    _quiet_libraries()
    try:
        set_loss_backend(loss_backend)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--loss-backend") from None
    from core.engine.pipeline import run_job
    from core.engine.spec import load_spec

    try:
        spec = load_spec(spec_path)
        result = run_job(
            spec,
            output,
            events=ConsoleEvents(),
            device=device,
            checkpoint_dir=output / "checkpoints" if resume else None,
        )
    except UnlearnError as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(2) from None
    _print_table(result.metrics)
    for name, path in result.artifacts.items():
        typer.echo(f"{name}: {path}")


@app.command("build-demo")
def build_demo(
    directory: Path = typer.Option(None, help="Default: $UNLEARN_DATA_DIR/demo."),
    size: str = typer.Option("demo", help="demo (~1M params) or fixture (tiny)."),
    seed: int = typer.Option(0),
) -> None:
    """Build the demo benchmark: corpus, tokenizer and a tiny Llama that knows it."""
    _quiet_libraries()
    from core.demo.build import build_model

    events = ConsoleEvents()
    info = build_model(directory or _data_dir() / "demo", size, seed, events)
    events.close()
    typer.echo(json.dumps(info, indent=2))


@app.command()
def bench(
    methods: str = typer.Option(
        "catnip,catnip_ref,catnip_seq,ga,npo,simnpo,flat,rmu,rmu_star",
        help="Comma-separated ids.",
    ),
    lrs: str = typer.Option(
        "paper,1e-4,3e-4",
        help="Learning rates; 'paper' = each method's default; 'none' for only the +KL runs.",
    ),
    retain_lr: str = typer.Option(
        "1e-4", help="LR of the +KL (retain data) runs; 'none' to skip them."
    ),
    sam_methods: str = typer.Option(
        "catnip,npo,simnpo",
        help="Methods also run with sharpness-aware unlearning at each numeric --lrs; "
        "'none' to skip.",
    ),
    sam_rho: float = typer.Option(0.05, help="The radius of those runs (hyperparameters.sam_rho)."),
    steps: int = typer.Option(60, help="max_steps of every run (the stop rule may end sooner)."),
    batch_size: int | None = typer.Option(
        None, help="Forget samples per step, every run (default: the demo job's)."
    ),
    forget_eos: bool = typer.Option(False, help="Count each forget response's EOS as a target."),
    forget_target: float | None = typer.Option(
        None,
        min=0.0,
        max=1.0,
        help="The stop rule's eval.forget_target, every run (default: the demo job's, 0.1: "
        "stop once forget KnowMem is at 10% of before; 0: train on while the utility budget "
        "allows, towards a model that never learned it).",
    ),
    recipes: str | None = typer.Option(
        None,
        help="Instead of the method grid: robust and selective recipes (comma-separated "
        "names from core/demo/recipes.py, or 'all'), each under the relearning sweep, on "
        "held-out neighbours, with time and peak memory.",
    ),
    output: Path = typer.Option(None, help="Default: $UNLEARN_DATA_DIR/bench."),
    device: str | None = typer.Option(None),
) -> None:
    """CATNIP and the baselines on the demo benchmark: a Markdown table and the Fig. 3 plot
    (with --recipes: the robust recipes' table)."""
    _quiet_libraries()
    from core.demo.bench import grid, run_bench
    from core.demo.build import demo_spec, ensure_model

    demo_dir = _data_dir() / "demo"
    ensure_model(demo_dir, events=ConsoleEvents(), reference=True)
    if recipes is not None:
        _bench_recipes(demo_dir, recipes, steps, output, device)
        return
    try:
        learning_rates = (
            []
            if lrs.strip() == "none"
            else [None if x.strip() == "paper" else float(x) for x in lrs.split(",")]
        )
        retain = None if retain_lr.strip() == "none" else float(retain_lr)
    except ValueError as exc:
        raise typer.BadParameter(
            f"--lrs {lrs!r} / --retain-lr {retain_lr!r}: {exc}; give numbers, "
            "'paper' (in --lrs) or 'none'"
        ) from exc
    sam = [] if sam_methods.strip() == "none" else [m.strip() for m in sam_methods.split(",")]
    runs = grid([m.strip() for m in methods.split(",")], learning_rates, retain, sam, sam_rho)
    out = output or _data_dir() / "bench"
    typer.echo(f"[bench] {len(runs)} runs -> {out}", err=True)
    base = demo_spec(demo_dir, max_steps=steps)
    base["hyperparameters"]["forget_eos"] = forget_eos
    if batch_size is not None:
        base["hyperparameters"]["batch_size"] = batch_size
    if forget_target is not None:
        base["eval"]["forget_target"] = forget_target
    run_bench(demo_dir, out, base, runs, device=device, echo=typer.echo)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"plot: {out / 'tradeoff.png'}")


def _bench_recipes(
    demo_dir: Path, names: str, steps: int, output: Path | None, device: str | None
) -> None:
    from core.demo.build import demo_spec
    from core.demo.recipes import RECIPES, run_recipes

    chosen = list(RECIPES) if names.strip() == "all" else [n.strip() for n in names.split(",")]
    unknown = [n for n in chosen if n not in RECIPES]
    if unknown:
        raise typer.BadParameter(f"--recipes: unknown {unknown}; known: {', '.join(RECIPES)}")
    out = output or _data_dir() / "bench-recipes"
    typer.echo(f"[bench] {len(chosen)} recipes -> {out}", err=True)
    run_recipes(demo_dir, out, demo_spec(demo_dir, max_steps=steps), chosen, device, typer.echo)
    typer.echo((out / "results.md").read_text())


def main() -> None:  # pragma: no cover
    app()
