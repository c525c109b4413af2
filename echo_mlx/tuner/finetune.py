"""`echo-mlx finetune`: win back the quality a converted model lost.

The student is the echo model (its consumers have no k/v projections); the
teacher, by default, is the unshared model it was converted from. The loss is
``alpha * KL(teacher || student) + (1 - alpha) * CE`` (echo_mlx.tuner.distill). The
loop is plain and linear (nanoGPT's train.py is the model), reusing mlx-lm's
pieces: LoRA/DoRA layers, datasets, schedules, gradient averaging.

Stages (echo_mlx.tuner.schedule): ``direct`` trains the target plan; ``progressive``
walks the sharing boundary down, each stage with its own optimizer and
learning-rate schedule, carrying the trained weights over. ``--layerwise-iters``
opens a direct run with layer-wise distillation (echo_mlx.tuner.layerwise): every
changed layer matches its teacher layer's output, then end-to-end KD.

Nothing is lost: ``ADAPTER_PATH/state`` (trainable weights, optimizer state,
step, data position) is written atomically every ``--save-every`` steps and on
Ctrl-C; ``--resume`` continues from it on the same batches, so the loss curve
matches an uninterrupted run. The dropout generator is re-seeded from
(seed, step) every step, so its draws are a function of the step too.
``adapters.safetensors`` holds the weights with the best validation loss on
the target plan; ``metrics.jsonl`` every report, ``loss.png`` the curve.
"""

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from . import adapters
from ..errors import EchoError
from ..generate import model_fingerprint
from ..io import checkpoint
from ..models.plans import SharingPlan
from .data import BUILTIN, batches, builtin_examples, load_data_dir, spread_batches
from .distill import distillation_loss, teacher_statistics
from .dylora import RankRange, dynamic_layers, scale_updates, set_rank
from .schedule import build_stages, stage_at
from .trainstate import TrainState, check_same_config, load_state, save_state

STATE, BEST, METRICS = "state", "best.json", "metrics.jsonl"
BUILTIN_WINDOW = 512  # tokens per built-in training window
OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}


@dataclass
class FinetuneArgs:
    model: str = "default"
    plan: Optional[str] = None  # default: the checkpoint's plan
    kv_init: Optional[str] = None  # default: the checkpoint's, else "own"
    teacher: str = "default"  # "default": the model the checkpoint came from; "none": no distillation
    data: Optional[str] = None  # default: the built-in corpus (training part) and chat set; or corpus | chat | a directory
    fine_tune_type: str = "lora"
    num_layers: Optional[int] = None  # default: the layers the plan changed, upwards
    lora_parameters: dict = field(default_factory=lambda: {"rank": 8, "dropout": 0.0, "scale": 20.0})
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    learning_rate: float = 1e-4
    lr_schedule: Optional[dict] = None
    batch_size: int = 4
    iters: int = 600
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    mask_prompt: bool = False
    kd_alpha: float = 1.0
    kd_temperature: float = 1.0
    schedule: str = "direct"
    stages: Optional[int] = None
    layers_per_stage: Optional[int] = None
    layerwise_iters: int = 0  # direct: open with layer-wise distillation (echo_mlx.tuner.layerwise)
    # Matching one layer's output tolerates a larger step than end-to-end KD does.
    layerwise_learning_rate: Optional[float] = None  # default: --learning-rate
    teacher_cache: Optional[str] = None  # a directory: the teacher's work per batch kept for reuse
    teacher_top_k: int = 64  # with teacher_cache: the teacher's likeliest tokens kept per position
    val_batches: int = 8
    steps_per_report: int = 10
    steps_per_eval: int = 100
    save_every: int = 50
    adapter_path: str = "adapters"
    seed: int = 0
    resume: bool = False
    # After the last step: a factor on the LoRA scale per rank, chosen on the validation batches (rank_scales).
    calibrate_scale: bool = False


# Settings a resumed run may change: they do not alter the training trajectory.
RESUMABLE_CHANGES = ("resume", "steps_per_report", "save_every", "calibrate_scale")


# ---- models -----------------------------------------------------------------
class Models:
    """The student for any stage plan, and the teacher."""

    def __init__(self, args: FinetuneArgs):
        self._sources = {}
        self._original = None  # the unshared source, built once when stages are fitted
        self.checkpoint = args.model if checkpoint.is_echo_checkpoint(args.model) else None
        if self.checkpoint:
            config = checkpoint.load_config(self.checkpoint)
            echo = config.get("echo", {})
            self.source = echo.get("source")
            self.checkpoint_plan = SharingPlan.from_config(config)
            self.kv_init = args.kv_init or echo.get("kv_init", "own")
            self.num_layers = config["num_hidden_layers"]
            self.target = SharingPlan.parse(args.plan, self.num_layers) if args.plan else self.checkpoint_plan
            self.tokenizer = None
        else:
            if not args.plan:
                raise EchoError(f"{args.model} is not an echo checkpoint: pass --plan (e.g. cla:2 or yoco) to convert it in memory")
            src = self._load_source(args.model)
            self.source, self.checkpoint_plan = args.model, None
            self.kv_init = args.kv_init or "own"
            self.num_layers = src.config["num_hidden_layers"]
            self.target = SharingPlan.parse(args.plan, self.num_layers)
            self.tokenizer = src.tokenizer
        self.model_name = args.model

    def _load_source(self, name: str):
        from ..io.sources import load_source

        if name not in self._sources:  # student stages and teacher share one copy
            self._sources[name] = load_source(name, dtype="float32")
        return self._sources[name]

    def student(self, plan: SharingPlan):
        from ..conversion.convert import fitted_model, shared_model, unshared_model

        if self.checkpoint and str(plan) == str(self.checkpoint_plan):
            model, tokenizer, _ = checkpoint.load(self.checkpoint)
            self.tokenizer = self.tokenizer or tokenizer
            return model
        if not self.source:
            raise EchoError(f"{self.checkpoint} does not record its source model: pass the source as --model with --plan")
        src = self._load_source(self.source)
        self.tokenizer = self.tokenizer or src.tokenizer
        if self.kv_init == "fit":  # every stage's plan fitted to the original (the same unshared model each time)
            self._original = self._original or unshared_model(src)
            return fitted_model(src, plan, teacher=self._original, progress=True)[0]
        return shared_model(src.config, src.weights, plan, kv_init=self.kv_init, source=src.source)[0]

    def teacher(self, name: str, student):
        from ..conversion.convert import shared_model

        if name == "none":
            return None
        name = self.source if name == "default" else name
        if not name:
            raise EchoError(f"{self.checkpoint} does not record its source model: pass --teacher PATH or --teacher none")
        src = self._load_source(name)
        vocab_size = student.args.vocab_size
        if src.config["vocab_size"] != vocab_size or src.tokenizer.get_vocab() != _vocab(self.tokenizer):
            raise EchoError(
                f"teacher {name} has another vocabulary ({src.config['vocab_size']} tokens vs the student's "
                f"{vocab_size}): distill from the model the student was converted from"
            )
        teacher, _ = shared_model(src.config, src.weights, SharingPlan.parse("none", src.config["num_hidden_layers"]))
        teacher.freeze()
        teacher.eval()
        return teacher


def _vocab(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer).get_vocab()


# ---- loss and evaluation ------------------------------------------------------
def make_loss(teacher, alpha: float, temperature: float, cache=None):
    """The KD loss; with a ``cache`` (echo_mlx.tuner.teacher_cache) the teacher's top-k
    distribution comes from disk once a batch has been seen."""
    # The teacher runs on its own CPU stream: MLX's element-wise CPU kernels
    # are single-threaded, so its softmaxes overlap the student's (~1.3x/step).
    teacher_stream = mx.new_stream(mx.default_device())

    def loss(model, batch, lengths):
        """(sum of per-token losses, number of tokens): sums make the mean exact
        across gradient-accumulation steps and distributed ranks."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        stats = top_k = None
        if teacher is not None and alpha > 0:
            with mx.stream(teacher_stream):
                if cache is not None:
                    top_k = cache.top_k(inputs)
                else:
                    stats = teacher_statistics(teacher(inputs), temperature)
        mean, count = distillation_loss(
            model(inputs), None, targets, mask, alpha=alpha if stats or top_k else 0.0,
            temperature=temperature, teacher_stats=stats, teacher_top_k=top_k,
        )
        return mean * count, count

    return loss


def evaluate(model, loss, examples, args: FinetuneArgs, rank: int, size: int) -> float:
    """Mean loss over ``val_batches`` validation batches spread over the lengths (fixed)."""
    if not examples:
        return float("nan")
    total, count = mx.array(0.0), mx.array(0.0)
    for batch, lengths in spread_batches(examples, args.batch_size, args.max_seq_length, args.val_batches, rank=rank, world_size=size):
        s, c = loss(model, batch, lengths)
        total, count = total + s, count + c
        mx.eval(total, count)
    if size > 1:
        total, count = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(count, stream=mx.cpu)
    return (total / count).item()


# ---- bookkeeping --------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl: one JSON record per report; a resumed run first drops
    the records after its checkpoint, so the file reads as one clean run."""

    def __init__(self, path: Path, resume_step: Optional[int], enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Progress:
    """A progress bar with loss, tokens/s and ETA (rich, as mlx-lm uses)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("finetune", total=total, completed=done, loss="-", tps="-")
        self.bar.start()

    def update(self, loss: float, tokens_per_second: float, description: str):
        if self.enabled:
            self.bar.update(self.task, advance=1, loss=f"{loss:.3f}", tps=f"{tokens_per_second:,.0f}", description=description)

    def print(self, text: str):
        if self.enabled:
            self.bar.console.print(text)

    def close(self):
        if self.enabled:
            self.bar.stop()


def _catch_ctrl_c(flag: list):
    """Make the first Ctrl-C a flag the loop acts on once the current step has finished (and is
    saved), not an exception raised wherever Python happens to be: raised inside the progress
    bar's lock it deadlocked the exit. A second Ctrl-C stops at once. Returns the handler to
    restore (None off the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)

    return signal.signal(signal.SIGINT, handler)


def _optimizer(args: FinetuneArgs, kind: str = "kd"):
    from mlx_lm.tuner.utils import build_schedule

    if args.optimizer not in OPTIMIZERS:
        raise EchoError(f"unknown optimizer {args.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if kind == "layerwise" and args.layerwise_learning_rate is not None:
        return OPTIMIZERS[args.optimizer](learning_rate=args.layerwise_learning_rate, **args.optimizer_config)
    lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    return OPTIMIZERS[args.optimizer](learning_rate=lr, **args.optimizer_config)


def _check_args(args: FinetuneArgs):
    if args.iters < 1:
        raise EchoError(f"--iters {args.iters} must be at least 1")
    if args.batch_size < 1 or args.grad_accumulation_steps < 1:
        raise EchoError("--batch-size and --grad-accumulation-steps must be at least 1")
    if args.teacher == "none" and args.kd_alpha not in (0.0, 1.0):
        raise EchoError("--kd-alpha needs a teacher: drop --teacher none or set --kd-alpha 0")
    if args.save_every < 1 or args.steps_per_report < 1 or args.steps_per_eval < 1:
        raise EchoError("--save-every, --steps-per-report and --steps-per-eval must be at least 1")
    if args.fine_tune_type not in adapters.FINE_TUNE_TYPES:
        raise EchoError(f"unknown --fine-tune-type {args.fine_tune_type!r}: use one of {', '.join(adapters.FINE_TUNE_TYPES)}")
    if args.fine_tune_type == "dylora":
        RankRange.from_parameters(args.lora_parameters)
    if args.calibrate_scale and args.fine_tune_type == "full":
        raise EchoError("--calibrate-scale calibrates a LoRA scale: use it with --fine-tune-type lora, dora or dylora")


@dataclass
class Result:
    steps: int
    tokens: int
    seconds: float
    best_val_loss: Optional[float]
    teacher_val_loss: Optional[float]
    adapter_path: Path


# ---- the run ------------------------------------------------------------------
def finetune(args: FinetuneArgs, *, progress: bool = False, stop_after: Optional[int] = None) -> Result:
    """Train; ``stop_after`` ends the process's work after that step (tests use it
    to simulate an interruption without killing the interpreter)."""
    _check_args(args)
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    main = rank == 0
    run_dir = Path(args.adapter_path)
    config = asdict(args)

    state = None
    if args.resume:
        state = load_state(run_dir / STATE)
        ignore = RESUMABLE_CHANGES + (("iters",) if args.schedule == "direct" else ())
        check_same_config(state.config, config, ignore=ignore)
    elif (run_dir / STATE).exists():
        raise EchoError(f"{run_dir} already holds a training run: pass --resume to continue it, or choose another --adapter-path")

    models = Models(args)
    stages = build_stages(
        models.target, args.iters, schedule=args.schedule, stages=args.stages,
        layers_per_stage=args.layers_per_stage, num_layers=args.num_layers, layerwise_iters=args.layerwise_iters,
    )
    first_student = models.student(stages[0].plan if state is None else stages[stage_at(stages, state.step + 1)].plan)
    tokenizer = models.tokenizer
    teacher = models.teacher(args.teacher, first_student)
    alpha = args.kd_alpha if teacher is not None else 0.0
    cache = None
    if args.teacher_cache and teacher is not None:
        from .teacher_cache import TeacherCache

        cache = TeacherCache(args.teacher_cache, teacher, top_k=args.teacher_top_k, temperature=args.kd_temperature)
    loss = make_loss(teacher, alpha, args.kd_temperature, cache)
    ce_loss = make_loss(teacher=None, alpha=0.0, temperature=1.0)

    if args.data is None or args.data in BUILTIN:
        train, valid = builtin_examples(tokenizer, min(BUILTIN_WINDOW, args.max_seq_length), args.data or "builtin")
    else:
        train, valid = load_data_dir(args.data, tokenizer, max_seq_length=args.max_seq_length, mask_prompt=args.mask_prompt)


    step = state.step if state else 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run_dir / METRICS, resume_step=step if state else None, enabled=main)
    best_file = run_dir / BEST
    best = json.loads(best_file.read_text()) if state and best_file.exists() else None
    teacher_val = evaluate(teacher, ce_loss, valid, args, rank, size) if teacher is not None and valid else None
    losses = {"kd": loss}
    if any(s.kind == "layerwise" for s in stages):
        losses["layerwise"] = _layerwise_loss(teacher, models.target, train, args, cache)
    if teacher_val is not None and step == 0:
        metrics.write(step=0, teacher_val_loss=teacher_val)

    data = batches(
        train, args.batch_size, args.max_seq_length, seed=args.seed,
        start=step * args.grad_accumulation_steps, rank=rank, world_size=size,
    )
    bar = Progress(args.iters, step, enabled=progress and main)
    carry = state.weights if state else {}
    tokens_seen = state.data_position.get("tokens", 0) if state else 0
    tokens_at_start = tokens_seen
    last_good = None  # (step, trainable weights, optimizer state, tokens seen)
    ranks = RankRange.from_parameters(args.lora_parameters) if args.fine_tune_type == "dylora" else None
    component_lr = ranks.lr_multipliers() if ranks is not None and ranks.lr != "constant" else None
    started = time.perf_counter()

    def validate(student, k, step, on_target, config_for_adapters, best):
        """Validation cross-entropy at ``step``, logged; the adapters saved if they are the best so far."""
        student.eval()
        if ranks is not None:
            set_rank(student, ranks.max_rank)  # the best step is chosen at the full rank
        val = evaluate(student, ce_loss, valid, args, rank, size)
        metrics.write(step=step, stage=k, val_loss=val, teacher_val_loss=teacher_val, tokens=tokens_seen)
        bar.print(f"step {step:>5}  val loss {val:.4f}" + (f"  (teacher {teacher_val:.4f})" if teacher_val else ""))
        if on_target and main and (best is None or val < best["val_loss"]):
            best = {"step": step, "val_loss": val}
            adapters.save(run_dir, student, config_for_adapters)
            best_file.write_text(json.dumps(best))
        return best

    student = None
    interrupted = []  # set by the first Ctrl-C, acted on when the step it interrupted has finished
    previous_handler = _catch_ctrl_c(interrupted)
    try:
        for k, stage in enumerate(stages):
            if stage.last_step <= step:
                continue
            student = first_student if student is None else models.student(stage.plan)
            # The untrained base identifies the adapters (plan + weights); only the last stage's are saved.
            fingerprint = model_fingerprint(student)
            mx.random.seed(args.seed)  # LoRA initialisation
            adapters.make_trainable(student, args.fine_tune_type, stage.trainable_from, args.lora_parameters)
            adapters.load_matching(student, carry)
            if args.grad_checkpoint:
                from mlx_lm.tuner.trainer import grad_checkpoint

                grad_checkpoint(student.layers[0])
            optimizer = _optimizer(args, stage.kind)
            if state is not None and stage_at(stages, state.step) == k and state.step >= stage.first_step:
                optimizer.state = state.optimizer
            state = None
            value_and_grad = nn.value_and_grad(student, losses[stage.kind])
            config_for_adapters = adapters.adapter_config(
                args.fine_tune_type, stage.trainable_from, args.lora_parameters,
                plan=str(stage.plan), fingerprint=fingerprint, model=models.model_name,
            )
            # Best-by-validation adapters come from stages that train the target plan itself
            # (the last one; with --layerwise-iters also the layer-wise phase).
            on_target = str(stage.plan) == str(models.target)
            label = f"stage {k + 1}/{len(stages)}" if len(stages) > 1 else "finetune"
            label += " (layer-wise)" if stage.kind == "layerwise" else ""
            if valid and step == 0 and on_target:
                # The start may already be the best weights (a fitted conversion is close to its
                # teacher): score it, so no step that makes things worse is kept as "best".
                best = validate(student, k, step, on_target, config_for_adapters, best)
            student.train()
            window_loss, window_tokens, window_time, window_ranks = 0.0, 0, 0.0, []
            while step < stage.last_step:
                step += 1
                tic = time.perf_counter()
                mx.random.seed(args.seed * 1_000_003 + step)  # dropout draws: a function of the step
                if ranks is not None and ranks.draw == "step":  # DyLoRA: this step trains the first `sampled` components
                    sampled = ranks.sample(args.seed, step)
                    set_rank(student, sampled)
                    window_ranks.append(sampled)
                grads, loss_sum, tokens = None, mx.array(0.0), mx.array(0.0)
                for micro in range(args.grad_accumulation_steps):
                    batch, lengths = next(data)
                    if ranks is not None and ranks.draw == "example":  # a rank per example of the global batch
                        sampled = ranks.sample_examples(args.seed, step, micro, args.batch_size)
                        set_rank(student, sampled[rank::size][: batch.shape[0]])
                        window_ranks.append(list(sampled))
                    (s, c), g = value_and_grad(student, batch, lengths)
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                    loss_sum, tokens = loss_sum + s, tokens + c
                    mx.eval(grads, loss_sum, tokens)
                if size > 1:
                    # average_gradients = all_sum / size; we want the global token mean.
                    grads = tree_map(lambda g: g * size, nn.average_gradients(grads))
                    loss_sum = mx.distributed.all_sum(loss_sum, stream=mx.cpu)
                    tokens = mx.distributed.all_sum(tokens, stream=mx.cpu)
                grads = tree_map(lambda g: g / tokens, grads)
                dynamic = dynamic_layers(student) if component_lr else []
                before = [(m.lora_a, m.lora_b) for m in dynamic]
                optimizer.update(student, grads)
                if component_lr:  # DyLoRA rank_lr: a learning rate per component
                    scale_updates(dynamic, before, component_lr)
                mx.eval(student.trainable_parameters(), optimizer.state)
                value, n = loss_sum.item() / tokens.item(), int(tokens.item())
                if not math.isfinite(value):
                    saved = load_state(run_dir / STATE).step if (run_dir / STATE).exists() else None
                    where = f"the checkpoint of step {saved} in {run_dir / STATE} is intact" if saved else "no checkpoint was written yet"
                    raise EchoError(f"loss became {value} at step {step}; stopped ({where}): lower --learning-rate, then --resume or start over")
                elapsed = time.perf_counter() - tic
                tokens_seen += n
                # The step is complete: snapshot it before reporting, so a Ctrl-C during
                # the report or validation saves this step. Immutable arrays: references are free.
                last_good = (step, adapters.trainable_weights(student), tree_map(lambda x: x, optimizer.state), tokens_seen)
                window_loss, window_tokens, window_time = window_loss + value * n, window_tokens + n, window_time + elapsed
                bar.update(value, n / elapsed, label)

                if step % args.steps_per_report == 0 or step == stage.last_step:
                    metrics.write(
                        step=step, stage=k, kind=stage.kind, train_loss=window_loss / window_tokens, tokens=tokens_seen,
                        tokens_per_second=window_tokens / window_time, learning_rate=optimizer.learning_rate.item(),
                        elapsed=time.perf_counter() - started, **({"ranks": window_ranks} if ranks else {}),
                    )
                    bar.print(f"step {step:>5}  loss {window_loss / window_tokens:.4f}  {window_tokens / window_time:,.0f} tok/s")
                    window_loss, window_tokens, window_time, window_ranks = 0.0, 0, 0.0, []
                if valid and (step % args.steps_per_eval == 0 or step == stage.last_step):
                    best = validate(student, k, step, on_target, config_for_adapters, best)
                    student.train()
                if main and (step % args.save_every == 0 or step == args.iters):
                    _save(run_dir, *last_good, args, config)
                if stop_after is not None and step >= stop_after:
                    raise _Stop()
                if interrupted:
                    raise KeyboardInterrupt
            carry = adapters.trainable_weights(student)
        if main and not valid:  # no validation set: the last weights are the result
            adapters.save(run_dir, student, config_for_adapters)
    except _Stop:
        pass
    except KeyboardInterrupt:
        bar.close()
        if main and last_good is not None:
            _save(run_dir, *last_good, args, config)
            raise EchoError(f"interrupted after step {last_good[0]}: checkpoint saved in {run_dir / STATE}; continue with --resume")
        raise EchoError("interrupted before the first step finished: nothing to save")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        if cache is not None:
            cache.flush()
    if args.calibrate_scale and main and valid and student is not None and step == args.iters:
        from .rank_scales import calibrate

        # The best validation step's adapters, as saved; scored on this process alone (no all_sum).
        adapters.load_matching(student, mx.load(str(run_dir / adapters.WEIGHTS)))
        student.eval()
        calibrate(run_dir, student, lambda m: evaluate(m, ce_loss, valid, args, 0, 1),
                  progress=print if progress else (lambda line: None))
    if main and step == args.iters:
        from .plot import plot_run

        plot_run(run_dir)
    return Result(step, tokens_seen - tokens_at_start, time.perf_counter() - started, best and best["val_loss"], teacher_val, run_dir)


def _layerwise_loss(teacher, target: SharingPlan, train, args: FinetuneArgs, cache=None):
    from .layerwise import changed_layers, layer_scales, make_layerwise_loss

    if teacher is None:
        raise EchoError("--layerwise-iters needs a teacher: drop --teacher none")
    if len(teacher.layers) != target.num_layers:
        raise EchoError(f"--layerwise-iters needs a teacher with the student's {target.num_layers} layers (it has {len(teacher.layers)})")
    # Scales from the first training batch in corpus order: the same on every rank and on resume.
    batch, _ = next(batches(train, args.batch_size, args.max_seq_length, shuffle=False))
    scales = layer_scales(teacher, batch[:, :-1], changed_layers(target.kv_sources, target.attention_sources))
    return make_layerwise_loss(teacher, target.kv_sources, scales, target.attention_sources, cache)


class _Stop(Exception):
    pass


def _save(run_dir, step, weights, optimizer_state, tokens_seen, args, config):
    state = TrainState(
        weights=weights,
        optimizer=optimizer_state,
        step=step,
        rng_key=mx.random.key(args.seed),
        data_position={"batches": step * args.grad_accumulation_steps, "tokens": tokens_seen},
        config=config,
    )
    save_state(run_dir / STATE, state)
