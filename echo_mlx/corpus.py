"""The built-in corpus: text that ships with Python, so everything runs offline.

``pydoc_data.topics`` (Python's own help texts, ~465k characters), values
joined in sorted key order with blank lines. The first half of its tokens is
for training/calibration, the second half is held out for perplexity.
"""

from typing import List


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def builtin_tokens(tokenizer) -> List[int]:
    """The corpus tokenized without special tokens (no BOS)."""
    return tokenizer.encode(builtin_text(), add_special_tokens=False)


def split(tokens: List[int]):
    """(training half, held-out half)."""
    half = len(tokens) // 2
    return tokens[:half], tokens[half:]


def heldout_windows(tokens: List[int], count: int = 16, length: int = 513) -> List[List[int]]:
    """``count`` windows of ``length`` tokens spread evenly over the held-out half."""
    start = len(tokens) // 2
    stride = (len(tokens) - start - length) // (count - 1)
    return [tokens[start + i * stride : start + i * stride + length] for i in range(count)]
