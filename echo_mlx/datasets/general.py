"""The built-in general set: the original model's own text in many genres.

The corpus is Python documentation and the chat set is chat; a model fitted
and adapted on those two alone drifts on any other text (on software
licences, which neither contains, the shipped 1.25x model was 1.18x the
original's perplexity against 1.07x on the corpus). ``generaldata/openings.jsonl``
holds 137 openings written for this project, in 33 genres (stories, news,
science, recipes, letters, reviews, poems, dialogues, ...; nothing legal, so
the licences stay a domain no adaptation data comes from);
``generaldata/samples.jsonl`` the original SmolLM2's continuation of each,
sampled once by ``scripts/make_general_set.py`` and shipped as data. Text the
teacher wrote itself is what distillation can match everywhere: its
next-token distributions on it are the teacher's own, across genres.

Splits are fixed by the opening's id, as in the chat set: ``id % 7 == 0``
held out (20 samples: measured, never trained on or chosen with),
``id % 7 == 3`` validation (20), the other 97 train.
"""

from pathlib import Path
from typing import List, Optional

from .chat import read_shipped_jsonl, split_of, target_scores  # noqa: F401  (split_of: the chat set's id-based splits)

GENERAL_DIR = Path(__file__).resolve().parent / "generaldata"
OPENINGS_FILE = GENERAL_DIR / "openings.jsonl"
SAMPLES_FILE = GENERAL_DIR / "samples.jsonl"


def read_openings() -> List[dict]:
    return read_shipped_jsonl(OPENINGS_FILE, "the general set")


def records(split: Optional[str] = None) -> List[dict]:
    """Samples (``opening`` + the original's ``continuation``) of one split, or all."""
    found = read_shipped_jsonl(SAMPLES_FILE, "the general set")
    return [r for r in found if split is None or r["split"] == split]


def text(record: dict) -> str:
    return record["opening"] + record["continuation"]


def token_ids(tokenizer, split: str) -> List[List[int]]:
    """Each sample of a split tokenized (no BOS, as the corpus is)."""
    return [tokenizer.encode(text(r), add_special_tokens=False) for r in records(split)]


def examples(tokenizer, split: str, max_seq_length: Optional[int] = None):
    """(token ids, 0) training examples: every token of the sample is a target."""
    return [(ids[:max_seq_length] if max_seq_length else ids, 0) for ids in token_ids(tokenizer, split)]


def packed(tokenizer, split: str) -> List[int]:
    """A split's samples one after another: text to calibrate on."""
    return [t for ids in token_ids(tokenizer, split) for t in ids]


def available() -> bool:
    return SAMPLES_FILE.is_file()


def scores(model, tokenizer, split: str = "valid", batch_size: int = 8, limit: Optional[int] = None) -> dict:
    """How a model scores a split's samples (the first ``limit``), every token after the
    first: perplexity and the share of tokens it ranks first."""
    items = examples(tokenizer, split)[:limit]
    return {"samples": len(items), **target_scores(model, items, batch_size)}
