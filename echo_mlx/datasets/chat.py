"""The built-in chat set: the original model's own answers, to teach and to measure behaviour.

``chatdata/prompts.jsonl`` holds 320 prompts written for this project (16
categories, 20 each, taking turns); ``chatdata/chat.jsonl`` the original
SmolLM2's greedy answers to them, generated once by
``scripts/make_chat_set.py`` and shipped as data. Adapting on them teaches a
converted model what the original *does* in a chat, which the corpus (Python
documentation) cannot.

The split is fixed by the prompt id (7 is coprime with the 16 categories, so
every category lands in every split): ``id % 7 == 0`` is held out (46
prompts: measured, never trained on or chosen with), ``id % 7 == 3`` is
validation (46: best-step choice), the other 228 train.
"""

import json
import math
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import EchoError

CHAT_DIR = Path(__file__).resolve().parent / "chatdata"
PROMPTS_FILE = CHAT_DIR / "prompts.jsonl"
CHAT_FILE = CHAT_DIR / "chat.jsonl"
SPLITS = ("train", "valid", "heldout")


def split_of(prompt_id: int) -> str:
    return {0: "heldout", 3: "valid"}.get(prompt_id % 7, "train")


def read_shipped_jsonl(path: Path, what: str = "the chat set") -> List[dict]:
    """The records of a JSONL file that ships with the package (``what`` names it in the error)."""
    if not path.is_file():
        raise EchoError(f"{path} is missing: reinstall echo-mlx from its repository ({what} ships with it)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_prompts() -> List[dict]:
    return read_shipped_jsonl(PROMPTS_FILE)


def records(split: Optional[str] = None) -> List[dict]:
    """Chat records (``messages``: user prompt, the original's answer) of one split, or all."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown chat split {split!r}: one of {SPLITS}")
    found = read_shipped_jsonl(CHAT_FILE)
    return [r for r in found if split is None or r["split"] == split]


def usable(tokenizer) -> bool:
    """Whether the tokenizer can render conversations (it has a chat template)."""
    return bool(getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "has_chat_template", False))


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    """A user prompt through the chat template with the assistant's turn opened (as generate does)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def example(tokenizer, record: dict):
    """(token ids of prompt + answer, prompt length): the answer ends with the
    template's end-of-turn when the original finished it, else where it was cut."""
    prompt = prompt_ids(tokenizer, record["messages"][0]["content"])
    answer = record["messages"][1]["content"]
    if record.get("finished", True):
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = prompt + tokenizer.encode(answer, add_special_tokens=False)
    if ids[: len(prompt)] != prompt:  # the template renders the user turn the same either way
        ids = prompt + ids[len(prompt):]
    return ids, len(prompt)


def examples(tokenizer, split: str, max_seq_length: Optional[int] = None):
    out = [example(tokenizer, r) for r in records(split)]
    if max_seq_length:
        out = [(ids[:max_seq_length], min(n, max_seq_length)) for ids, n in out]
    return out


def packed(tokenizer, split: str) -> List[int]:
    """A split's conversations (prompt and answer) one after another: text to calibrate on."""
    return [t for ids, _ in examples(tokenizer, split) for t in ids]


def answer_scores(model, tokenizer, split: str = "heldout", batch_size: int = 8, limit: Optional[int] = None) -> dict:
    """How a model scores the original's answers (the first ``limit`` of a split): mean NLL
    per answer token, and the fraction of answer tokens it ranks first (greedy agreement)."""
    items = examples(tokenizer, split)[:limit]
    return {"answers": len(items), **target_scores(model, items, batch_size)}


def target_scores(model, items, batch_size: int = 8) -> dict:
    """Mean NLL, perplexity and top-1 share over the targets of (token ids, prompt length)
    examples: every token at or after the prompt is scored (from the second on)."""
    nll, first, count = 0.0, 0, 0
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        tokens = mx.array([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        logits = model(tokens[:, :-1]).astype(mx.float32)
        targets = tokens[:, 1:]
        positions = mx.arange(1, width)[None]
        starts = mx.array([n for _, n in chunk])[:, None]
        ends = mx.array([len(ids) for ids, _ in chunk])[:, None]
        mask = (positions >= starts) & (positions < ends)
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")
        top = (logits.argmax(-1) == targets)
        nll += (losses * mask).sum().item()
        first += (top & mask).sum().item()
        count += mask.sum().item()
    return {"tokens": int(count), "nll": nll / count, "ppl": math.exp(nll / count), "top1": first / count}
