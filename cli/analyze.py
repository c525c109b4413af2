"""`echo-mlx analyze`: which layers should share K/V (similarity), or plans by measured damage (--search)."""

from pathlib import Path
from typing import List, Optional

import typer

from echo_mlx.errors import EchoError


def analyze(
    model: str = typer.Option("default", "--model", help="The original (unshared) model: 'default', a .gguf, an HF/mlx-lm directory or a hub id."),
    out: Path = typer.Option(Path("analysis"), help="Directory for the report and its plots."),
    calibration: Optional[Path] = typer.Option(None, help="UTF-8 text file to calibrate on (default: the built-in corpus's training half)."),
    search: bool = typer.Option(False, "--search", help="Search plans by measured damage: fit every (consumer, producer) pair within --reach and score it by KL to the original (minutes)."),
    target_reduction: List[float] = typer.Option([], help="KV-cache reduction(s) to propose a plan for (repeatable): floor(L / R) layers keep K/V. Default: 2, or 1.25, 1.5 and 2 with --search."),
    window: Optional[int] = typer.Option(None, help="Tokens per calibration window (default 256; 512 with --search)."),
    num_windows: int = typer.Option(8, help="Calibration windows, spread evenly over the text."),
    evaluate: int = typer.Option(0, help="Convert the N best-scoring candidate plans naively and rank them by validation perplexity."),
    kv_init: str = typer.Option("own", help="Producer K/V weights of the evaluated plans: 'own' or 'mean'."),
    eval_windows: int = typer.Option(4, help="--evaluate: validation windows (built-in corpus, training half's validation part)."),
    eval_length: int = typer.Option(256, help="--evaluate: scored tokens per validation window."),
    reach: int = typer.Option(3, help="--search: a consumer may read any of the this many layers below it."),
    calibration_tokens: int = typer.Option(4096, help="--search: tokens each pair is fitted on."),
    score_tokens: int = typer.Option(2048, help="--search: further tokens each fitted pair is scored on (KL to the original)."),
    ridge: float = typer.Option(3e-2, help="--search: relative ridge strength of the fits (shrinking towards the original's weights, as convert's default)."),
):
    """Which layers should share K/V: layer similarity and a suggested plan, or (--search) plans by measured damage."""
    if search:
        return _search(model, out, calibration, target_reduction or [1.25, 1.5, 2.0], window or 512, reach,
                       calibration_tokens, score_tokens, ridge)
    from echo_mlx.analysis.analyze import analyze as run, write_report

    window = window or 256
    target_reduction = target_reduction or [2.0]
    if len(target_reduction) > 1:
        raise EchoError("one --target-reduction at a time without --search: add --search to propose several")
    result = run(
        model, calibration=calibration, window=window, num_windows=num_windows,
        target_reduction=target_reduction[0], evaluate=evaluate, kv_init=kv_init,
        eval_windows=eval_windows, eval_length=eval_length, progress=True,
    )
    paths = write_report(out, result)
    s = result.suggestion
    typer.echo(f"similarity of {result.similarity.num_layers} layers over {num_windows} windows of {window} tokens: {result.calibration}")
    why = (f"lowest naive perplexity ({s.perplexity:.2f}) of the {evaluate} best-scoring candidates"
           if result.evaluation else f"similarity score {s.score:.3f} (mean (K + V) / 2 of consumers to their producers)")
    typer.echo(f"suggested plan: {len(s.plan.producers)} K/V layers, {s.plan.kv_reduction:.2f}x KV reduction, {why}")
    typer.echo(result.convert_command())
    if result.evaluation:
        e = result.evaluation
        typer.echo(f"naive conversion (--kv-init {e['kv_init']}), perplexity on {e['protocol']}; unshared: {e['baseline_perplexity']:.2f}")
        width = max(len(c["plan"]) for c in e["ranking"])
        typer.echo(f"{'naive ppl':>12}  {'KV red.':>7}  {'score':>6}  {'plan':<{width}}  name")
        for c in e["ranking"]:
            typer.echo(f"{c['perplexity']:>12.2f}  {c['kv_reduction']:>6.2f}x  {c['score']:>6.3f}  {c['plan']:<{width}}  {c['name']}")
    typer.echo(f"wrote {', '.join(p.name for p in paths)} to {out}")


def _search(model, out, calibration, reductions, window, reach, calibration_tokens, score_tokens, ridge):
    import json

    from echo_mlx.conversion.fit import FitOptions
    from echo_mlx.analysis.search import plot_frontier, run

    result = run(model, reductions=reductions, reach=reach, calibration=calibration, window=window,
                 calibration_tokens=calibration_tokens, score_tokens=score_tokens,
                 options=FitOptions(ridge=ridge), progress=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EchoError(f"cannot create --out {out} ({e.strerror}): choose another directory")
    (out / "search.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    plot_frontier(result, out / "frontier.png")
    s = result.settings
    typer.echo(f"{len(result.damage)} (consumer, producer) pairs within {reach} layers, each fitted on {s['fit_tokens']:,} "
               f"tokens and scored by KL to the original on {s['score_tokens']:,} more ({s['calibration']}); "
               f"{result.minutes:.1f} minutes")
    typer.echo(f"perplexity on {s['validation']}; original {s['original_ppl']:.2f}")
    typer.echo(f"{'reduction':>9}  {'KL sum':>7}  {'KL':>7}  {'naive ppl':>10}  {'fitted ppl':>10}  plan")
    for r in result.plans:
        typer.echo(f"{r['kv_reduction']:>8.2f}x  {r['predicted_kl']:>7.3f}  {r['kl']:>7.3f}  {r['naive_ppl']:>10.1f}  "
                   f"{r['fitted_ppl']:>10.2f}  {r['plan']}")
    best = result.plans[-1]["plan"] if result.plans else None
    if best:
        typer.echo(f"echo-mlx convert --model {model} --plan {best} --kv-init fit --out echo-searched")
    typer.echo(f"wrote search.json, frontier.png to {out}")
