"""Training data for the adaptation finetune.

Two sources: a ``--data`` directory in mlx-lm's format (``train.jsonl``,
``valid.jsonl``, ``test.jsonl`` with ``text``, ``messages`` or
``prompt``/``completion`` records, parsed by mlx-lm's own dataset classes), or,
with no ``--data``, the built-in data: windows of the built-in corpus's
training part (echo_mlx.datasets.corpus; validation from its validation part), the
built-in chat set's training answers (echo_mlx.datasets.chat) and the general set's
training samples (echo_mlx.datasets.general; both with validation from their validation
splits). ``--data corpus``, ``--data chat`` or ``--data general`` takes one of them.
Held-out text (the corpus's held-out windows, the chat and general sets' held-out
splits) is never among them.

We read the JSONL ourselves first so a broken line is reported with its
number, and count the examples longer than ``--max-seq-length`` (truncated,
with a warning) instead of letting them fail deep inside training. An example
whose prompt fills the whole window has nothing left to learn from: it is
dropped (counted in a warning), since a batch of such examples has no target.
"""

import json
import types
import warnings
from pathlib import Path
from typing import List, Tuple

from ..datasets import BUILTIN_SETS, corpus
from ..errors import EchoError


def read_jsonl(path: Path) -> List[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EchoError(f"{path}:{number}: not valid JSON ({e.msg}): fix or remove that line")
            if not isinstance(record, dict):
                raise EchoError(f"{path}:{number}: each line must be a JSON object like {{\"text\": ...}}")
            records.append(record)
    return records


def load_data_dir(data_dir, tokenizer, *, max_seq_length: int, mask_prompt: bool = False):
    """(train, valid) as lists of (token ids, prompt length) pairs."""
    from mlx_lm.tuner.datasets import create_dataset

    data_dir = Path(data_dir)
    if not (data_dir / "train.jsonl").is_file():
        raise EchoError(f"{data_dir} has no train.jsonl: put train.jsonl (and valid.jsonl) there, one JSON record a line")
    config = types.SimpleNamespace(mask_prompt=mask_prompt)
    out = []
    for name in ("train", "valid"):
        path = data_dir / f"{name}.jsonl"
        records = read_jsonl(path) if path.is_file() else []
        if name == "train" and not records:
            raise EchoError(f"{path} is empty: add at least one record")
        if not records:
            out.append([])
            continue
        try:
            dataset = create_dataset(records, tokenizer, config)
        except ValueError as e:
            first = str(e).splitlines()[0]
            raise EchoError(f"{path}: {first}: use records with 'text', 'messages' or 'prompt'+'completion'")
        out.append(_truncated([dataset.process(dataset[i]) for i in range(len(dataset))], max_seq_length, path))
    return out[0], out[1]


def _truncated(examples: List[Tuple[list, int]], max_seq_length: int, path) -> List[Tuple[list, int]]:
    long = sum(len(ids) > max_seq_length for ids, _ in examples)
    if long:
        warnings.warn(f"{path}: {long} of {len(examples)} examples are longer than --max-seq-length "
                      f"{max_seq_length} tokens and were truncated")
    return with_targets([(ids[:max_seq_length], min(offset, max_seq_length)) for ids, offset in examples], path)


def with_targets(examples: List[Tuple[list, int]], source) -> List[Tuple[list, int]]:
    """The examples with at least one token after the prompt (after truncation); the others are
    dropped with a count: two of them in one batch would leave its loss nothing to average."""
    kept = [(ids, offset) for ids, offset in examples if offset < len(ids)]
    if len(kept) < len(examples):
        warnings.warn(f"{source}: {len(examples) - len(kept)} of {len(examples)} examples have no token after their "
                      f"prompt within the window and were dropped: raise --max-seq-length to keep them")
    return kept


BUILTIN = BUILTIN_SETS  # --data keywords


def builtin_examples(tokenizer, seq_length: int, which: str = "builtin"):
    """(train, valid) examples from the built-in data: corpus windows of ``seq_length``
    tokens, the chat set's answers (their prompts masked from the loss) and the general
    set's samples (every token a target); ``which`` picks one of them."""
    from ..datasets import chat, general

    if which not in BUILTIN:
        raise EchoError(f"unknown built-in data {which!r}: use one of {', '.join(BUILTIN)} or a directory")
    train, valid = builtin_windows(tokenizer, seq_length) if which in ("builtin", "corpus") else ([], [])
    if which == "chat" and not chat.usable(tokenizer):
        raise EchoError("--data chat needs a tokenizer with a chat template: use --data corpus or a --data directory")
    if which in ("builtin", "chat") and chat.usable(tokenizer):
        train += chat.examples(tokenizer, "train", seq_length)
        valid += chat.examples(tokenizer, "valid", seq_length)
    if which in ("builtin", "general") and general.available():
        train += general.examples(tokenizer, "train", seq_length)
        valid += general.examples(tokenizer, "valid", seq_length)
    return with_targets(train, "built-in training data"), with_targets(valid, "built-in validation data")


def builtin_windows(tokenizer, seq_length: int):
    """(train, valid) windows of ``seq_length`` tokens from the corpus's first half:
    its training and validation parts (echo_mlx.datasets.corpus), never the held-out half."""
    valid, train = corpus.first_half_parts(corpus.builtin_tokens(tokenizer))
    as_examples = lambda segments: [(w, 0) for w in corpus.windows(segments, seq_length)]
    return as_examples(train), as_examples(valid)


def batches(examples, batch_size: int, max_seq_length: int, *, seed: int = 0, start: int = 0,
            shuffle: bool = True, rank: int = 0, world_size: int = 1):
    """Endless (batch, lengths) pairs, mlx-lm's layout, reproducible from any position.

    Like mlx_lm.tuner.trainer.iterate_batches (length-sorted batches, rank r of
    n takes every n-th example of each global batch), but each epoch's order is
    drawn from its own seeded generator instead of NumPy's global one, so
    batch number ``start`` can be produced without replaying the ones before
    it: that is what makes ``--resume`` continue on the same data.
    ``lengths`` rows are (prompt offset, length) as mlx-lm's losses expect.
    """
    import numpy as np

    if batch_size % world_size:
        raise EchoError(f"--batch-size {batch_size} must be divisible by the {world_size} distributed ranks")
    if len(examples) < batch_size:
        raise EchoError(f"{len(examples)} examples are fewer than --batch-size {batch_size}: add data or lower --batch-size")
    groups = _length_sorted_groups(examples, batch_size)
    number = start
    while True:
        epoch, index = divmod(number, len(groups))
        permutation = np.random.default_rng([seed, epoch]).permutation(len(groups)) if shuffle else range(len(groups))
        chosen = [examples[i] for i in groups[permutation[index]][rank::world_size]]
        yield _pad(chosen, max_seq_length)
        number += 1


def spread_batches(examples, batch_size: int, max_seq_length: int, count: int, *, rank: int = 0, world_size: int = 1):
    """``count`` (batch, lengths) pairs spread evenly over the length-sorted
    batches (all of them for count -1), for validation: the first ``count``
    batches in length order would score only the shortest examples."""
    import numpy as np

    groups = _length_sorted_groups(examples, batch_size)
    count = len(groups) if count == -1 else max(1, min(count, len(groups)))
    picked = sorted(set(np.linspace(0, len(groups) - 1, count).round().astype(int).tolist()))
    return [_pad([examples[i] for i in groups[g][rank::world_size]], max_seq_length) for g in picked]


def _length_sorted_groups(examples, batch_size: int):
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def _pad(chosen, max_seq_length: int):
    import numpy as np
    import mlx.core as mx

    lengths = [min(len(ids), max_seq_length) for ids, _ in chosen]
    # Pad to one more than a multiple of 32, as mlx-lm does: few distinct shapes.
    width = min(1 + 32 * ((max(lengths) + 31) // 32), max_seq_length)
    array = np.zeros((len(chosen), width), np.int32)
    for row, ((ids, _), n) in enumerate(zip(chosen, lengths)):
        array[row, :n] = ids[:n]
    offsets = [min(offset, n) for (_, offset), n in zip(chosen, lengths)]
    return mx.array(array), mx.array(list(zip(offsets, lengths)))
