"""The loss curve of a finetune run: ``ADAPTER_PATH/loss.png`` from ``metrics.jsonl``.

Training loss (the optimised loss: KD and/or CE; layer-wise steps on their
own line, their loss is a relative error) and validation
cross-entropy against training tokens, with the teacher's validation
cross-entropy as the line to reach. Progressive stages are shaded.
"""

import json
from pathlib import Path

from ..errors import EchoError


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EchoError(f"{run_dir} has no metrics.jsonl: pass the --adapter-path of a finetune run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir, out=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    teacher = next((r["teacher_val_loss"] for r in records if r.get("teacher_val_loss") is not None), None)
    # Validation records carry their tokens; older runs only the step: interpolate.
    import numpy as np

    tokens_at = lambda r: r["tokens"] if "tokens" in r else float(
        np.interp(r["step"], [0] + [t["step"] for t in train], [0] + [t["tokens"] for t in train]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # Layer-wise steps optimise a relative hidden-state error, not nats: a separate line.
    layerwise = [r for r in train if r.get("kind") == "layerwise"]
    end_to_end = [r for r in train if r.get("kind") != "layerwise"]
    if end_to_end:
        ax.plot([r["tokens"] for r in end_to_end], [r["train_loss"] for r in end_to_end], label="train loss", color="tab:blue", alpha=0.7)
    if layerwise:
        ax.plot([r["tokens"] for r in layerwise], [r["train_loss"] for r in layerwise], ":", color="tab:green",
                label="layer-wise loss (relative error)")
    if val:
        xs = [tokens_at(r) for r in val]
        ax.plot(xs, [r["val_loss"] for r in val], "o-", label="validation cross-entropy", color="tab:orange")
    if teacher is not None:
        ax.axhline(teacher, ls="--", color="gray", label=f"teacher validation cross-entropy ({teacher:.3f})")
    stages = sorted({r["stage"] for r in train if "stage" in r})
    for k in stages[1:]:
        first = min(r["tokens"] for r in train if r.get("stage") == k)
        ax.axvline(first, color="lightgray", lw=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    # Cross-entropy in nats is log-perplexity: the right axis reads it as perplexity.
    ax.secondary_yaxis("right", functions=(lambda x: np.exp(np.minimum(x, 700)), lambda p: np.log(np.maximum(p, 1e-12)))).set_ylabel("perplexity (validation)")
    ax.set_title(f"echo-mlx finetune: {Path(run_dir).name}")
    ax.legend()
    return save_figure(fig, Path(out) if out else Path(run_dir) / "loss.png")


def save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
