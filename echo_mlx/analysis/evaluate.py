"""Held-out perplexity with one fixed protocol (see echo_mlx.datasets.corpus).

16 windows of 513 tokens over the second half of the built-in corpus, 512
scored targets each, no BOS; ppl = exp(mean NLL over all 8,192 targets).
mlx-lm's llama on SmolLM2-135M float32 weights gives 12.53.

Text of another domain, which no adaptation data comes from: three software
licences (GNU GPL v3, Apache 2.0, Mozilla Public License 2.0: legal English,
as Debian ships them in /usr/share/common-licenses; each allows verbatim
copies), measured with the same protocol (16 windows of 513 tokens, spread
evenly over the whole text).

Choices that aim at that goal are made on other licences of the same domain
(GPL-2, LGPL-2.1, MPL-1.1, GFDL-1.3, Artistic, CC0-1.0, as Debian ships them),
with every 32-token span of the held-out licences cut out: the held-out
licences inform no choice.
"""

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..datasets.corpus import builtin_tokens, heldout_windows, spans, windows, without_spans


def mean_nll(model, windows, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        batch = mx.array(windows[b : b + batch_size])
        logits = model(batch[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="sum")
        total += nll.item()
        count += batch[:, 1:].size
    return total / count


def perplexity(model, windows, batch_size: int = 4) -> float:
    return math.exp(mean_nll(model, windows, batch_size))


def heldout_perplexity(model, tokenizer, windows=None, batch_size: int = 4) -> float:
    return perplexity(model, windows or heldout_windows(builtin_tokens(tokenizer)), batch_size)


EVALDATA = Path(__file__).resolve().parents[1] / "datasets" / "evaldata"
OTHER_DOMAIN = EVALDATA / "licenses.txt"
OTHER_DOMAIN_VALIDATION = EVALDATA / "licenses-validation.txt"


def licence_tokens(tokenizer, path: Path = OTHER_DOMAIN) -> list:
    """A licence file's text as token ids, with no special tokens (the windows cut it themselves)."""
    return tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)


def other_domain_windows(tokenizer, count: int = 16, length: int = 513):
    tokens = licence_tokens(tokenizer)
    stride = (len(tokens) - length) // (count - 1)
    return [tokens[i * stride : i * stride + length] for i in range(count)]


def other_domain_validation_windows(tokenizer, count: int = 16, length: int = 513):
    """``count`` windows of the validation licences, spread evenly; none holds a
    32-token span of the held-out licences (cut out, no window straddles a cut)."""
    heldout = spans([licence_tokens(tokenizer)])
    segments = without_spans(licence_tokens(tokenizer, OTHER_DOMAIN_VALIDATION), heldout)
    candidates = windows(segments, length)
    step = len(candidates) / count
    return [candidates[int(i * step)] for i in range(count)]
