"""The built-in general set (echo_mlx.datasets.general): its splits, its examples, and how samples are scored."""

import math
from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from echo_mlx.datasets import general


def test_every_opening_has_its_sample_in_its_split_and_every_split_spans_the_genres():
    openings = {o["id"]: o for o in general.read_openings()}
    samples = general.records()
    assert sorted(r["id"] for r in samples) == sorted(openings)
    for r in samples:
        assert r["opening"] == openings[r["id"]]["opening"] and r["split"] == general.split_of(r["id"])
    # A few end at once (the original's end-of-text after a complete sentence): that is its behaviour too.
    assert sum(bool(r["continuation"].strip()) for r in samples) >= 0.95 * len(samples)
    splits = Counter(r["split"] for r in samples)
    assert splits["heldout"] >= 15 and splits["valid"] >= 15 and splits["train"] > splits["heldout"] * 3
    assert len({r["genre"] for r in general.records("train")}) == len({o["genre"] for o in openings.values()})


def test_examples_are_whole_samples_with_every_token_a_target(smollm2):
    tokenizer = smollm2.tokenizer
    record = general.records("train")[0]
    (ids, offset), *_ = general.examples(tokenizer, "train")
    assert offset == 0 and tokenizer.decode(ids) == general.text(record)
    assert all(len(ids) <= 64 for ids, _ in general.examples(tokenizer, "train", 64))


def test_scores_match_a_direct_computation_sample_by_sample(smollm2):
    from echo_mlx.conversion.convert import unshared_model

    model, tokenizer = unshared_model(smollm2), smollm2.tokenizer
    found = general.scores(model, tokenizer, "heldout", batch_size=3, limit=3)  # padded to the longest of three
    nll, count = 0.0, 0
    for ids in general.token_ids(tokenizer, "heldout")[:3]:
        tokens = mx.array([ids])
        logits = model(tokens[:, :-1]).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum").item()
        count += len(ids) - 1
    assert found["tokens"] == count and found["samples"] == 3
    assert abs(math.log(found["ppl"]) - nll / count) < 1e-4
    assert found["top1"] > 0.4  # its own samples: the original ranks most of their tokens first
