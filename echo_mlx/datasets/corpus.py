"""The built-in corpus: text that ships with Python, so everything runs offline.

``pydoc_data.topics`` (Python's own help texts, ~465k characters), values
joined in sorted key order with blank lines. The second half of its tokens is
held out: the perplexity protocol's windows (``heldout_windows``) come from it.
The first half is cut in two:

- *validation* (its first ``VALIDATION_TOKENS``): every choice a tool makes
  from data (analyze's ranking, a ridge strength, the best finetune step)
  is made here;
- *training* (the rest): fit calibration and finetune batches.

The help texts repeat themselves (the same paragraph under several topics),
so the halves share text: 2,179 spans of 32 tokens of the held-out windows
also occur in the first half. Those spans are cut out of validation and
training (``SPAN``), which leaves them as several contiguous segments; a
window never straddles a cut, so no new span is created at a seam.
"""

import functools
from pathlib import Path
from typing import List, Sequence

from ..errors import EchoError

SPAN = 32  # no span of this many held-out window tokens occurs in training or validation text
VALIDATION_TOKENS = 8 * 513  # the first half's first tokens, kept for choices


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def builtin_tokens(tokenizer) -> List[int]:
    """The corpus tokenized without special tokens (no BOS)."""
    return _tokens(tokenizer)


@functools.lru_cache(maxsize=4)
def _encode(tokenizer) -> tuple:
    return tuple(tokenizer.encode(builtin_text(), add_special_tokens=False))


def _tokens(tokenizer) -> List[int]:
    try:
        return list(_encode(tokenizer))
    except TypeError:  # an unhashable tokenizer object: no caching
        return tokenizer.encode(builtin_text(), add_special_tokens=False)


def split(tokens: List[int]):
    """(first half, held-out half)."""
    half = len(tokens) // 2
    return tokens[:half], tokens[half:]


def heldout_windows(tokens: List[int], count: int = 16, length: int = 513) -> List[List[int]]:
    """``count`` windows of ``length`` tokens spread evenly over the held-out half."""
    start = len(tokens) // 2
    stride = (len(tokens) - start - length) // (count - 1)
    return [tokens[start + i * stride : start + i * stride + length] for i in range(count)]


def spans(sequences: Sequence[Sequence[int]], n: int = SPAN) -> set:
    """Every run of ``n`` consecutive tokens in ``sequences``."""
    return {tuple(s[j : j + n]) for s in sequences for j in range(len(s) - n + 1)}


def without_spans(tokens: Sequence[int], forbidden: set, n: int = SPAN) -> List[List[int]]:
    """``tokens`` with every occurrence of a forbidden ``n``-token span cut out:
    the contiguous segments that remain, in order."""
    drop = bytearray(len(tokens))
    for j in range(len(tokens) - n + 1):
        if tuple(tokens[j : j + n]) in forbidden:
            drop[j : j + n] = b"\x01" * n
    segments, current = [], []
    for token, dropped in zip(tokens, drop):
        if dropped:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(token)
    if current:
        segments.append(current)
    return segments


def first_half_parts(tokens: List[int]):
    """(validation segments, training segments) of the first half, held-out window spans cut out."""
    first, _ = split(tokens)
    forbidden = spans(heldout_windows(tokens))
    return (without_spans(first[:VALIDATION_TOKENS], forbidden),
            without_spans(first[VALIDATION_TOKENS:], forbidden))


def windows(segments: Sequence[Sequence[int]], length: int, stride: int = 0) -> List[List[int]]:
    """Consecutive windows of ``length`` tokens inside each segment (none straddles a cut)."""
    stride = stride or length
    return [list(s[i : i + length]) for s in segments for i in range(0, len(s) - length + 1, stride)]


def validation_windows(tokenizer, length: int = 513) -> List[List[int]]:
    """The windows choices are made on (perplexity over ``length - 1`` targets each)."""
    return windows(first_half_parts(builtin_tokens(tokenizer))[0], length)


def training_segments(tokenizer) -> List[List[int]]:
    """The training part: what fit calibration and finetune batches read."""
    return first_half_parts(builtin_tokens(tokenizer))[1]


def read_text_file(path, flag: str) -> str:
    """A user's UTF-8 text file (calibration text), or one clear error naming ``flag``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EchoError(f"{flag} file {path} does not exist: pass a UTF-8 text file")
    except UnicodeDecodeError as e:
        raise EchoError(f"{flag} file {path} is not UTF-8 text (byte {e.start}): convert it or pass another file")
    except OSError as e:
        raise EchoError(f"cannot read {flag} file {path} ({e.strerror}): pass a readable UTF-8 text file")
