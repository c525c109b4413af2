"""Held-out text stays held out: no span of the measured windows in anything built-in that trains or chooses."""

import pytest

from echo_mlx.conversion.fit import FitOptions, calibration
from echo_mlx.datasets import chat, corpus, general
from echo_mlx.tuner.data import builtin_examples


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def heldout_spans(tokenizer):
    return corpus.spans(corpus.heldout_windows(corpus.builtin_tokens(tokenizer)))


def leaks(sequences, forbidden):
    return [s for s in sequences if corpus.spans([s]) & forbidden]


def test_the_corpus_halves_do_share_text_so_the_check_is_not_vacuous(tokenizer, heldout_spans):
    first, _ = corpus.split(corpus.builtin_tokens(tokenizer))
    assert corpus.spans([first]) & heldout_spans  # pydoc topics repeat paragraphs across the halves


@pytest.mark.parametrize("length", [64, 256, 512, 2048])
def test_no_heldout_span_in_builtin_training_or_validation_data(tokenizer, heldout_spans, length):
    train, valid = builtin_examples(tokenizer, length)
    assert train and valid
    assert not leaks([ids for ids, _ in train + valid], heldout_spans)


@pytest.fixture(scope="module")
def heldout_chat_spans(tokenizer):
    return corpus.spans([ids[n:] for ids, n in chat.examples(tokenizer, "heldout")])


@pytest.fixture(scope="module")
def heldout_general_spans(tokenizer):
    return corpus.spans(general.token_ids(tokenizer, "heldout"))


def test_no_heldout_span_in_fit_calibration_or_choice_windows(tokenizer, heldout_spans, heldout_chat_spans,
                                                              heldout_general_spans):
    windows, described = calibration(tokenizer, None, FitOptions(tokens=96 * 512))
    assert len(windows) == 96 and "chat" in described and "general" in described
    assert not leaks(windows, heldout_spans)
    assert not leaks(windows, heldout_chat_spans)
    assert not leaks(windows, heldout_general_spans)
    assert not leaks(corpus.validation_windows(tokenizer), heldout_spans)
    assert not leaks(corpus.validation_windows(tokenizer, 257), heldout_spans)


def test_heldout_chat_prompts_are_in_no_other_split(tokenizer, heldout_chat_spans):
    held = chat.records("heldout")
    assert len(held) >= 30
    other = {r["messages"][0]["content"] for r in chat.records("train") + chat.records("valid")}
    assert not other & {r["messages"][0]["content"] for r in held}
    train, valid = builtin_examples(tokenizer, 512)
    assert not leaks([ids for ids, _ in train + valid], heldout_chat_spans)


def test_heldout_general_samples_are_in_no_other_split_and_never_trained_on(tokenizer, heldout_general_spans):
    held = general.records("heldout")
    assert len(held) >= 15 and len({r["genre"] for r in held}) >= 10
    others = general.records("train") + general.records("valid")
    assert not {r["opening"] for r in held} & {r["opening"] for r in others}
    train, valid = builtin_examples(tokenizer, 512)
    assert not leaks([ids for ids, _ in train + valid], heldout_general_spans)
    # ... while its training samples are there (so the check above looks where they would be).
    general_train = general.examples(tokenizer, "train", 512)
    assert all(example in train for example in general_train[:5])


def test_no_adaptation_data_is_legal_text_so_the_licences_stay_another_domain():
    openings = " ".join(r["opening"] for r in general.read_openings()).lower()
    assert not any(word in openings for word in ("licen", "copyright", "warranty", "legal", "contract", "law"))


def test_validation_licences_hold_no_span_of_the_heldout_licences(tokenizer):
    from echo_mlx.analysis.evaluate import (OTHER_DOMAIN_VALIDATION, licence_tokens, other_domain_validation_windows,
                                            other_domain_windows)

    held = corpus.spans([licence_tokens(tokenizer)])
    assert corpus.spans([licence_tokens(tokenizer, OTHER_DOMAIN_VALIDATION)]) & held  # GPL-2 shares GPL-3's phrases: the cut is needed
    windows = other_domain_validation_windows(tokenizer)
    assert len(windows) == 16 and all(len(w) == 513 for w in windows)
    assert len({tuple(w) for w in windows}) == 16
    assert not leaks(windows, held)
    assert not leaks(windows, corpus.spans(other_domain_windows(tokenizer)))


def test_cutting_spans_removes_every_occurrence_and_keeps_the_rest_in_order():
    tokens = list(range(100)) + list(range(40, 60)) + list(range(200, 260))
    forbidden = corpus.spans([list(range(45, 55))], n=8)
    segments = corpus.without_spans(tokens, forbidden, n=8)
    assert not corpus.spans(segments, n=8) & forbidden
    kept = [t for s in segments for t in s]
    assert kept == [t for t in tokens if not 45 <= t < 55]  # exactly the spans' tokens are gone
    assert all(len(w) == 16 for w in corpus.windows(segments, 16))
    assert not any(set(w) & set(range(45, 55)) for w in corpus.windows(segments, 16))


def test_calibration_keywords_pick_the_built_in_sets_and_take_turns(tokenizer):
    options = FitOptions(tokens=6 * 512)
    corpus_only, chat_only, general_only = (calibration(tokenizer, k, options)[0] for k in ("corpus", "chat", "general"))
    assert calibration(tokenizer, "corpus+chat", options)[0] == [w for pair in zip(corpus_only, chat_only) for w in pair][:6]
    triples = [w for triple in zip(corpus_only, chat_only, general_only) for w in triple]
    assert calibration(tokenizer, None, options)[0] == calibration(tokenizer, "builtin", options)[0] == triples[:6]
    assert len({tuple(w) for w in triples}) == len(triples)  # three different sources
