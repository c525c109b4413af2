import json

import pytest
from fixtures import bpe_tokenizer_json

from echo_mlx.datasets.corpus import builtin_tokens, heldout_windows, split
from echo_mlx.errors import EchoError
from echo_mlx.tuner.data import batches, builtin_windows, load_data_dir, spread_batches


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_tokenizer_json()),
                                  eos_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return TokenizerWrapper(tok)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_text_chat_and_completions_records_load(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"text": "The capital of France is Paris."})] * 3)
    write(tmp_path / "valid.jsonl", [json.dumps({"prompt": "Capital of Italy?", "completion": "Rome"})])
    train, valid = load_data_dir(tmp_path, tokenizer, max_seq_length=64)
    assert len(train) == 3 and len(valid) == 1
    assert train[0][0][-1] == tokenizer.eos_token_id


def test_broken_jsonl_names_the_line(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"text": "ok"}), '{"text": "missing quote}', json.dumps({"text": "x"})])
    with pytest.raises(EchoError, match=r"train.jsonl:2: not valid JSON") as err:
        load_data_dir(tmp_path, tokenizer, max_seq_length=64)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("lines, words", [([], "is empty"), (["[1, 2]"], "must be a JSON object"),
                                          ([json.dumps({"body": "x"})], "use records with 'text'")])
def test_empty_or_unsupported_data_is_refused(tmp_path, tokenizer, lines, words):
    write(tmp_path / "train.jsonl", lines)
    with pytest.raises(EchoError, match=words):
        load_data_dir(tmp_path, tokenizer, max_seq_length=64)
    with pytest.raises(EchoError, match="has no train.jsonl"):
        load_data_dir(tmp_path / "nowhere", tokenizer, max_seq_length=64)


def test_long_examples_are_truncated_with_a_count(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"text": "word " * 200}), json.dumps({"text": "short"})])
    with pytest.warns(UserWarning, match="1 of 2 examples are longer than --max-seq-length 16"):
        train, _ = load_data_dir(tmp_path, tokenizer, max_seq_length=16)
    assert max(len(ids) for ids, _ in train) == 16


def test_examples_whose_prompt_fills_the_window_are_dropped_with_a_count(tmp_path, tokenizer):
    # A batch of two such examples once left finetune dividing by zero target tokens.
    long_prompt = {"prompt": "word " * 40, "completion": "Rome"}
    write(tmp_path / "train.jsonl", [json.dumps(long_prompt), json.dumps({"prompt": "Capital?", "completion": "Rome"})])
    with pytest.warns(UserWarning, match="1 of 2 examples have no token after their prompt"):
        train, _ = load_data_dir(tmp_path, tokenizer, max_seq_length=16, mask_prompt=True)
    assert len(train) == 1 and all(offset < len(ids) for ids, offset in train)


def test_builtin_examples_all_have_targets_even_in_a_short_window():
    from echo_mlx.tuner.data import builtin_examples
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_tokenizer_json()),
                                  eos_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.warns(UserWarning, match="no token after their prompt"):
        train, valid = builtin_examples(TokenizerWrapper(tok), 16)
    assert train and valid and all(offset < len(ids) for ids, offset in train + valid)


def test_builtin_windows_never_touch_the_heldout_half(tokenizer):
    tokens = builtin_tokens(tokenizer)
    train_half, _ = split(tokens)
    train, valid = builtin_windows(tokenizer, 256)
    assert all(len(ids) == 256 for ids, _ in train + valid)
    used = sum(len(ids) for ids, _ in train + valid)
    assert used <= len(train_half)
    first_heldout = heldout_windows(tokens)[0]
    assert len(train_half) <= len(tokens) // 2 and first_heldout == tokens[len(tokens) // 2 : len(tokens) // 2 + 513]


def test_validation_batches_span_the_lengths_not_only_the_shortest():
    examples = [(list(range(1, n + 1)), 0) for n in range(3, 43)]  # 40 examples, lengths 3..42
    picked = spread_batches(examples, 4, 64, 3)
    widths = [int(lengths[:, 1].max()) for _, lengths in picked]
    assert widths == [6, 22, 42]  # first, middle and last of the 10 length-sorted batches
    every = spread_batches(examples, 4, 64, -1)
    first = next(batches(examples, 4, 64, shuffle=False))
    assert len(every) == 10 and (every[0][0] == first[0]).all()
    assert len(spread_batches(examples, 4, 64, 50)) == 10
