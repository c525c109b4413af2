"""The `echo-mlx` command line: one sub-command per user verb.

Flags follow mlx-lm's (`mlx_lm.convert`, `mlx_lm.generate`) where the verb
exists there. Every user error is an EchoError: printed as one line, exit 2.
"""

import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.29 vendors click; its exceptions are not click's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from . import blas  # noqa: F401  (imported first: loads OpenBLAS before mlx)
from .errors import EchoError

app = typer.Typer(
    help="LLaMA on MLX with key/value caches shared across layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def convert(
    model: str = typer.Option("default", "--model", "--hf-path", help="Source: 'default' (SmolLM2-135M), a .gguf file, a Hugging Face or mlx-lm directory, or a hub id."),
    plan: str = typer.Option("none", help="Sharing plan: a preset (see `echo-mlx plans`) or a string like 0_0_2_2."),
    out: str = typer.Option(..., "--out", "--mlx-path", help="Directory to write the echo checkpoint to."),
    kv_init: str = typer.Option("own", help="'own': producers keep their K/V weights; 'mean': the mean of the layers sharing them; 'fit': 'own', then every changed layer fitted to the original on calibration text (minutes)."),
    calibration: Optional[Path] = typer.Option(None, help="--kv-init fit: UTF-8 text to fit on (default: the built-in corpus's training part)."),
    calibration_tokens: int = typer.Option(24576, help="--kv-init fit: calibration tokens (whole windows of 512)."),
    ridge: float = typer.Option(1e-3, help="--kv-init fit: relative ridge strength of the least-squares solves."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the weights (affine)."),
    q_bits: int = typer.Option(4, help="Bits per weight when quantizing."),
    q_group_size: int = typer.Option(64, help="Group size when quantizing."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16. Default: float32 on CPU hosts, the source's own precision on Apple silicon."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
):
    """Convert a pretrained LLaMA into an echo checkpoint with a sharing plan."""
    from .convert import convert as run
    from .fit import FitOptions

    fit_options = FitOptions(tokens=calibration_tokens, ridge=ridge) if kv_init == "fit" else None
    if kv_init != "fit" and calibration is not None:
        raise EchoError("--calibration is for --kv-init fit: add --kv-init fit or drop --calibration")
    *_, summary = run(
        model, plan, kv_init=kv_init, quantize=quantize, q_bits=q_bits,
        q_group_size=q_group_size, dtype=dtype, out=out, force=force,
        revision=revision, calibration=calibration, fit_options=fit_options, progress=True,
    )
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"wrote {out}")


@app.command()
def plans(
    model: Optional[str] = typer.Option(None, help="Resolve presets for this model (default: the embedded SmolLM2)."),
    layers: Optional[int] = typer.Option(None, help="Resolve presets for this many layers instead of loading a model."),
    plan: List[str] = typer.Option([], help="Resolve only these plans (repeatable)."),
):
    """List the sharing-plan presets, resolved for a model."""
    from .plans import PRESETS, SharingPlan

    num_layers = layers or _num_layers(model or "default")
    half = max(2, num_layers // 2)
    concrete = {":K": ":2", ":N": f":{half}", ":B": f":{half}", "yoco:W": "yoco:4096", "lckv:W": "lckv:2"}
    examples = list(plan)
    for preset in [] if plan else PRESETS:
        for generic, value in concrete.items():
            preset = preset.replace(generic, value)
        examples.append(preset)
    typer.echo(f"{num_layers} layers; N = number of layers computing K/V; reduction = KV cache saving")
    for text in examples:
        resolved = SharingPlan.parse(text, num_layers)
        iterated = " (iterative: targets above consumers)" if resolved.cyclic_blocks else ""
        if resolved.attention_consumers:
            iterated += f" (EchoAtt: {len(resolved.attention_consumers)} layers cache V only)"
        typer.echo(f"{text:<20} {len(resolved.producers):>3} K/V layers  {resolved.kv_reduction:5.2f}x  {resolved}{iterated}")


def _num_layers(model: str) -> int:
    from . import checkpoint
    from .sources import load_source

    if checkpoint.is_echo_checkpoint(model):
        return checkpoint.load_config(model)["num_hidden_layers"]
    return load_source(model).config["num_hidden_layers"]


@app.command()
def info(model: Optional[str] = typer.Option(None, help="Also describe this echo checkpoint.")):
    """Versions, device and BLAS in use (and a checkpoint's plan)."""
    import mlx.core as mx
    import mlx_lm

    from . import __version__
    from .sources import default_model_path

    typer.echo(f"echo-mlx {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    metal = mx.metal.is_available() if hasattr(mx, "metal") else False
    typer.echo(f"device: {mx.default_device()} (Metal {'available' if metal else 'not available'})")
    typer.echo(f"BLAS: {blas.status()}")
    from .kernels import dispatch

    typer.echo(f"attention: {dispatch.describe()}")
    try:
        typer.echo(f"default model: {default_model_path()}")
    except EchoError as e:
        typer.echo(f"default model: missing ({e})")
    if model:
        from . import checkpoint
        from .plans import SharingPlan

        config = checkpoint.load_config(model)
        p = SharingPlan.from_config(config)
        typer.echo(f"plan: {config.get('echo', {}).get('plan')} = {p} ({p.kv_reduction:.2f}x KV reduction)")
        typer.echo(f"source: {config.get('echo', {}).get('source')}")


def _true_or_false(value: str, flag: str) -> bool:
    if value.lower() in ("true", "t", "1", "yes"):
        return True
    if value.lower() in ("false", "f", "0", "no"):
        return False
    raise EchoError(f"{flag} takes True or False, not {value!r}")


def _load_model(model: str, plan: Optional[str], adapter_path: Optional[str]):
    from . import shipped
    from .api import load

    if plan is None and model == "default" and adapter_path is None and shipped.available():
        loaded = shipped.load()  # weights/: the default model adapted to its sharing plan (checksum verified)
        card = shipped.read_card()
        r = card["results"]
        # stderr: piped output stays the reply alone.
        typer.echo(f"shipped model {shipped.SHIPPED.name}: plan {card['plan']} ({card['kv_reduction']:.2f}x smaller KV cache), "
                   f"held-out perplexity {r['adapted_ppl']:.2f} (original {r['original_ppl']:.2f}); --plan none runs the original",
                   err=True)
        return loaded
    model_, tokenizer = load(model, plan=plan or "none")
    if adapter_path is not None:
        from . import adapters

        model_ = adapters.apply(model_, adapter_path, model)
    return model_, tokenizer


def _read_prompt(prompt: str) -> str:
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise EchoError("the prompt is empty: pass text with --prompt or pipe it with --prompt -")
    return prompt


def _chat_prompt(tokenizer, prompt: str, system_prompt: Optional[str], ignore_chat_template: bool,
                 add_generation_prompt: bool = True):
    """Token ids of the prompt, through the chat template when there is one."""
    prompt = _read_prompt(prompt)
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@app.command()
def generate(
    model: str = typer.Option("default", help="An echo checkpoint, or a source model converted on the fly with --plan."),
    plan: Optional[str] = typer.Option(None, help="Sharing plan when --model is not an echo checkpoint ('none': unshared). Default: the shipped adapted model for --model default, else none."),
    adapter_path: Optional[str] = typer.Option(None, help="LoRA adapters written by finetune."),
    prompt: str = typer.Option("Hello", "-p", "--prompt", help="Prompt text ('-' reads stdin)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Batched generation: one prompt per line."),
    batch_size: int = typer.Option(8, help="Sequences decoded together with --prompts-file."),
    system_prompt: Optional[str] = typer.Option(None),
    ignore_chat_template: bool = typer.Option(False),
    max_tokens: int = typer.Option(100, "-m", "--max-tokens"),
    temp: float = typer.Option(0.0, "--temp"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    seed: Optional[int] = typer.Option(None),
    max_kv_size: Optional[int] = typer.Option(None, help="Keep a sliding window of this many tokens per producer cache."),
    kv_bits: Optional[int] = typer.Option(None, help="Quantize the KV cache to this many bits (4 or 8)."),
    kv_group_size: int = typer.Option(64, help="Group size of the KV-cache quantization."),
    quantized_kv_start: int = typer.Option(5000, help="Quantize the KV cache once it holds this many tokens."),
    prefill_step_size: int = typer.Option(2048),
    prompt_cache_file: Optional[Path] = typer.Option(None, help="Continue from a cache written by cache-prompt."),
    truncate_prompt: bool = typer.Option(False, help="Keep the last tokens of a prompt longer than the context."),
    verbose: str = typer.Option("True", help="Print the closing statistics (True/False, as mlx_lm.generate)."),
):
    """Stream a completion with the shared (reduced) KV cache."""
    verbose = _true_or_false(verbose, "--verbose")
    import mlx.core as mx

    from . import generate as gen
    from .kernels import dispatch

    gen.check_options(kv_bits, kv_group_size, max_kv_size)
    dispatch.check()  # a forced ECHO_MLX_ATTENTION=kernel without Metal fails before the model loads
    if seed is not None:
        mx.random.seed(seed)
    model_, tokenizer = _load_model(model, plan, adapter_path)
    sampler = gen.sampler_from(temp, top_p, top_k, min_p)

    if prompts_file is not None:
        lines = [l for l in prompts_file.read_text().splitlines() if l.strip()] if prompts_file.is_file() else []
        if not lines:
            raise EchoError(f"{prompts_file} has no prompts: write one prompt per line")
        prompts = [gen.fit_prompt(_chat_prompt(tokenizer, l, system_prompt, ignore_chat_template), model_, max_kv_size, truncate_prompt) for l in lines]
        texts, stats = gen.generate_batch(model_, tokenizer, prompts, max_tokens=max_tokens, sampler=sampler,
                                          max_kv_size=max_kv_size, batch_size=batch_size, prefill_step_size=prefill_step_size)
        for i, text in enumerate(texts):
            typer.echo(f"--- {i}: {lines[i]}\n{text}")
        if verbose:
            typer.echo("=" * 10)
            typer.echo(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
            typer.echo(f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} tokens-per-sec")
            typer.echo(f"Peak memory: {stats.peak_memory:.3f} GB")
            typer.echo(f"Attention: {dispatch.summary()}")
        return

    if prompt_cache_file is not None:
        cache = gen.load_cache_file(prompt_cache_file, model_)
        # The cached prefix holds the conversation start: send the query alone.
        ids = tokenizer.encode(_read_prompt(prompt), add_special_tokens=False)
    else:
        cache = gen.make_prompt_cache(model_, max_kv_size)
        ids = gen.fit_prompt(_chat_prompt(tokenizer, prompt, system_prompt, ignore_chat_template), model_, max_kv_size, truncate_prompt)
    for piece in gen.stream(model_, tokenizer, ids, cache=cache, max_tokens=max_tokens, sampler=sampler,
                            kv_bits=kv_bits, kv_group_size=kv_group_size,
                            quantized_kv_start=quantized_kv_start, prefill_step_size=prefill_step_size):
        if isinstance(piece, gen.Stats):
            typer.echo()
            if verbose:
                for line in piece.lines():
                    typer.echo(line)
        else:
            typer.echo(piece, nl=False)


@app.command("cache-prompt")
def cache_prompt(
    prompt_cache_file: Path = typer.Option(..., help="The .safetensors file to write."),
    model: str = typer.Option("default", help="An echo checkpoint, or a source model converted with --plan."),
    plan: Optional[str] = typer.Option(None, help="Sharing plan when --model is not an echo checkpoint ('none': unshared). Default: the shipped adapted model for --model default, else none."),
    adapter_path: Optional[str] = typer.Option(None),
    prompt: str = typer.Option(..., "-p", "--prompt", help="Prompt text ('-' reads stdin)."),
    system_prompt: Optional[str] = typer.Option(None),
    ignore_chat_template: bool = typer.Option(False),
    max_kv_size: Optional[int] = typer.Option(None),
    kv_bits: Optional[int] = typer.Option(None),
    kv_group_size: int = typer.Option(64),
    quantized_kv_start: int = typer.Option(5000),
    prefill_step_size: int = typer.Option(2048),
    truncate_prompt: bool = typer.Option(False),
):
    """Prefill a prompt (e.g. a long document) once and save its shared cache."""
    from . import generate as gen

    gen.check_options(kv_bits, kv_group_size, max_kv_size)
    model_, tokenizer = _load_model(model, plan, adapter_path)
    # Cache the conversation up to the user's turn; generate appends the query.
    ids = _chat_prompt(tokenizer, prompt, system_prompt, ignore_chat_template, add_generation_prompt=False)
    ids = gen.fit_prompt(ids, model_, max_kv_size, truncate_prompt)
    cache = gen.make_prompt_cache(model_, max_kv_size)
    tps = gen.prefill(model_, ids, cache, prefill_step_size, kv_bits, kv_group_size, quantized_kv_start)
    gen.save_cache_file(prompt_cache_file, cache, model_, model)
    typer.echo(f"cached {len(ids)} tokens at {tps:.1f} tokens-per-sec into {prompt_cache_file}")


@app.command()
def finetune(
    model: Optional[str] = typer.Option(None, help="An echo checkpoint, or a source model with --plan (default: 'default')."),
    plan: Optional[str] = typer.Option(None, help="Target sharing plan (default: the checkpoint's)."),
    kv_init: Optional[str] = typer.Option(None, help="Producer K/V init when converting: own | mean | fit (fitted to the original on the built-in corpus, minutes)."),
    teacher: Optional[str] = typer.Option(None, help="'default' (the model the checkpoint was converted from), a source model, or 'none'."),
    data: Optional[str] = typer.Option(None, help="mlx-lm data dir (train/valid.jsonl), or 'corpus' / 'chat' for one built-in set; default: the built-in corpus and chat set."),
    fine_tune_type: Optional[str] = typer.Option(None, help="lora | dora | full."),
    num_layers: Optional[int] = typer.Option(None, help="Layers to train, from the top; -1 = all. Default: the layers the plan changed."),
    batch_size: Optional[int] = typer.Option(None),
    iters: Optional[int] = typer.Option(None),
    val_batches: Optional[int] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None),
    steps_per_report: Optional[int] = typer.Option(None),
    steps_per_eval: Optional[int] = typer.Option(None),
    save_every: Optional[int] = typer.Option(None),
    adapter_path: Optional[str] = typer.Option(None, help="Run directory: adapters, checkpoints, metrics, loss.png."),
    max_seq_length: Optional[int] = typer.Option(None),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint"),
    grad_accumulation_steps: Optional[int] = typer.Option(None),
    mask_prompt: Optional[bool] = typer.Option(None, "--mask-prompt"),
    optimizer: Optional[str] = typer.Option(None, help="adam | adamw | sgd."),
    kd_alpha: Optional[float] = typer.Option(None, help="Weight of KL(teacher||student); 1 - alpha goes to cross-entropy."),
    kd_temperature: Optional[float] = typer.Option(None),
    schedule: Optional[str] = typer.Option(None, help="direct | progressive (ECHO-LLaMA's moving boundary)."),
    stages: Optional[int] = typer.Option(None, help="Progressive: number of stages."),
    layers_per_stage: Optional[int] = typer.Option(None, help="Progressive: boundary step per stage (default 1)."),
    layerwise_iters: Optional[int] = typer.Option(None, help="First N steps: each changed layer matches the teacher layer's output (then KD)."),
    layerwise_learning_rate: Optional[float] = typer.Option(None, help="Learning rate of the layer-wise steps (default: --learning-rate)."),
    seed: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, help="Continue the run in --adapter-path from its last checkpoint."),
    config: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML file with any of these settings (mlx-lm's lora config keys)."),
):
    """Adapt a converted model (LoRA/DoRA/full, distillation, progressive schedule)."""
    from .finetune import FinetuneArgs, finetune as run

    settings = _read_yaml(config) if config else {}
    given = {k: v for k, v in locals().items() if k not in ("config", "settings", "run", "FinetuneArgs") and v is not None}
    if not resume:
        given.pop("resume")
    unknown = set(settings) - set(FinetuneArgs.__dataclass_fields__)
    if unknown:
        raise EchoError(f"{config}: unknown keys {', '.join(sorted(unknown))}: use the names of `echo-mlx finetune --help` with underscores")
    args = FinetuneArgs(**{**settings, **given})
    result = run(args, progress=True)
    best = f", best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    teacher_line = f" (teacher {result.teacher_val_loss:.4f})" if result.teacher_val_loss is not None else ""
    typer.echo(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s{best}{teacher_line}")
    typer.echo(f"adapters: {result.adapter_path}")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        settings = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EchoError(f"config file {path} does not exist")
    except yaml.YAMLError as e:
        raise EchoError(f"{path} is not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(settings, dict):
        raise EchoError(f"{path} must hold a mapping of setting: value")
    return settings


@app.command()
def fuse(
    model: str = typer.Option("default", help="The base the adapters were trained on (checkpoint, or source with --plan)."),
    plan: str = typer.Option("none", help="Sharing plan when --model is not an echo checkpoint."),
    adapter_path: str = typer.Option("adapters", help="The finetune run directory."),
    out: str = typer.Option(..., "--out", "--save-path", help="Directory for the fused echo checkpoint."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Fold adapters into the weights: an echo checkpoint for generate and mlx-lm."""
    from .fuse import fuse as run

    run(model, adapter_path, out, plan=plan, force=force)
    typer.echo(f"wrote {out}")


@app.command()
def plot(run: Path = typer.Argument(..., help="A finetune --adapter-path."), out: Optional[Path] = typer.Option(None)):
    """Draw a finetune run's loss curve (train, validation, teacher) as a PNG."""
    from .plot import plot_run

    typer.echo(f"wrote {plot_run(run, out)}")


@app.command()
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
    ridge: float = typer.Option(1e-3, help="--search: relative ridge strength of the fits."),
):
    """Which layers should share K/V: layer similarity and a suggested plan, or (--search) plans by measured damage."""
    if search:
        return _search(model, out, calibration, target_reduction or [1.25, 1.5, 2.0], window or 512, reach,
                       calibration_tokens, score_tokens, ridge)
    from .analyze import analyze as run, write_report

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

    from .fit import FitOptions
    from .search import plot_frontier, run

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


def main(argv=None):
    try:
        return app(args=argv, standalone_mode=False)
    except EchoError as e:
        print(f"echo-mlx: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("echo-mlx: aborted", file=sys.stderr)
        sys.exit(130)
    except ClickException as e:
        e.show()
        sys.exit(e.exit_code)
