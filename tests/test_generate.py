"""Generation with the compact shared cache, through mlx-lm's own loop."""

import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures import write_hf_dir
from mlx_lm.generate import generate_step
from test_real_model import REAL_PLANS, convert_in_memory

import echo_mlx
from echo_mlx import cli
from echo_mlx import generate as gen
from echo_mlx.errors import EchoError
from echo_mlx.io.checkpoint import kv_cache_bytes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    # float64 so that cached and uncached computations agree to rounding even
    # for naive plans, whose inflated activations turn float32 rounding into
    # flipped greedy tokens (see test_real_model).
    return dataclasses.replace(smollm2, weights={k: v.astype(mx.float64) for k, v in smollm2.weights.items()})


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    write_hf_dir(root / "hf", dtype="float32")
    cli.main(["convert", "--model", str(root / "hf"), "--plan", "cla:2", "--out", str(root / "echo")])
    return root / "echo"


def greedy(model, ids, n, cache=None):
    cache = cache if cache is not None else model.make_cache()
    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=cache)]


@pytest.mark.parametrize("plan", REAL_PLANS)
def test_greedy_generation_equals_the_uncached_reference(smollm2_f64, plan):
    model = convert_in_memory(smollm2_f64, plan)
    ids = smollm2_f64.tokenizer.encode(PROMPT, add_special_tokens=False)
    out = greedy(model, ids, 32)
    assert len(out) == 32
    sequence = mx.array([ids + out])
    if model.model.cyclic_blocks:
        # Producers above consumers: the parallel forward is exact only up to
        # 9 tokens, so the reference is the exact token-by-token computation.
        cache = model.make_cache()
        logits = mx.concatenate([model(sequence[:, t : t + 1], cache=cache) for t in range(sequence.shape[1])], axis=1)
    else:
        logits = model(sequence)  # one uncached causal forward = every step's full recompute
    reference = logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
    assert out == reference


@pytest.mark.parametrize("plan", ["cla:2", "echoatt:2"])
def test_batched_generation_equals_one_prompt_at_a_time(smollm2_f64, plan):
    model = convert_in_memory(smollm2_f64, plan)
    tok = smollm2_f64.tokenizer
    prompts = [tok.encode(p, add_special_tokens=False) for p in (PROMPT, "One, two, three, four", "Hi")]
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    texts, _ = gen.generate_batch(model, TokenizerWrapper(tok), prompts, max_tokens=8, sampler=None,
                                  max_kv_size=None, batch_size=3)
    singles = [tok.decode(greedy(model, p, 8)) for p in prompts]
    assert texts == singles


def test_generate_cli_streams_and_reports_kv_bytes(tiny_ckpt):
    result = subprocess.run([sys.executable, "-m", "echo_mlx", "generate", "--model", str(tiny_ckpt),
                             "-p", "Hello", "-m", "8", "--seed", "0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    stats = result.stdout.split("=" * 10)[-1]
    assert "Generation: 8 tokens" in stats or "Generation:" in stats
    assert "in 1 producer caches for 2 layers" in stats and "(2.00x)" in stats
    assert "Attention: ops for " in stats  # head dim 16: below the decode kernels' 32, and no Metal here


def test_prompt_cache_round_trips_in_a_new_process(tiny_ckpt, tmp_path):
    cache_file = tmp_path / "doc.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "echo_mlx", *a], capture_output=True, text=True, cwd=ROOT)
    made = run("cache-prompt", "--model", str(tiny_ckpt), "--prompt", "A long document about Paris. " * 8,
               "--prompt-cache-file", str(cache_file))
    assert made.returncode == 0, made.stderr
    fresh = run("generate", "--model", str(tiny_ckpt), "--prompt-cache-file", str(cache_file),
                "-p", "Summarise it", "-m", "12", "--verbose", "False")
    assert fresh.returncode == 0, fresh.stderr

    model, tokenizer = echo_mlx.load(str(tiny_ckpt))
    cache = gen.load_cache_file(cache_file, model)
    here = "".join(p for p in gen.stream(model, tokenizer, tokenizer.encode("Summarise it", add_special_tokens=False),
                                         cache=cache, max_tokens=12) if isinstance(p, str))
    assert fresh.stdout.strip() == here.strip() and here.strip()


def test_prompt_cache_from_another_plan_or_model_is_refused(tiny_ckpt, tmp_path, capsys):
    model, tokenizer = echo_mlx.load(str(tiny_ckpt))
    cache = model.make_cache()
    model(mx.array([tokenizer.encode("hello there")]), cache=cache)
    path = tmp_path / "c.safetensors"
    gen.save_cache_file(path, cache, model, str(tiny_ckpt))
    other_plan, _ = echo_mlx.load(str(tiny_ckpt.parent / "hf"), plan="none")
    with pytest.raises(EchoError, match="was made for plan 0_0, this model uses 0_1"):
        gen.load_cache_file(path, other_plan)
    same_source_mean_init, _ = echo_mlx.load(str(tiny_ckpt.parent / "hf"), plan="cla:2", kv_init="mean")
    with pytest.raises(EchoError, match="was made with another model"):  # only W_K/W_V differ
        gen.load_cache_file(path, same_source_mean_init)
    same_model, _ = echo_mlx.load(str(tiny_ckpt.parent / "hf"), plan="cla:2")
    assert len(gen.load_cache_file(path, same_model)) == 1  # converted in memory = the checkpoint
    other_weights = tmp_path / "hf2"
    write_hf_dir(other_weights, dtype="float32", seed=7)
    other_model, _ = echo_mlx.load(str(other_weights), plan="cla:2")
    with pytest.raises(EchoError, match="was made with another model"):
        gen.load_cache_file(path, other_model)


def test_stock_mlx_lm_generate_answers_on_an_echo_checkpoint(tiny_ckpt):
    result = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_ckpt),
                             "--trust-remote-code", "--prompt", "Hello", "--max-tokens", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Generation: 5 tokens" in result.stdout


def test_stock_mlx_lm_server_answers_on_an_echo_checkpoint(tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(tiny_ckpt),
                               "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(route, payload, deadline=time.time() + 120):
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(payload).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.loads(response.read())
            except (ConnectionError, urllib.error.URLError):
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)

    try:
        completion = post("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert completion["usage"]["completion_tokens"] >= 1
        chat = {"messages": [{"role": "user", "content": "Say hi " * 8}], "max_tokens": 4, "temperature": 0}
        first = post("/v1/chat/completions", chat)
        assert first["choices"][0]["message"]["content"] is not None
        again = post("/v1/chat/completions", chat)  # same prefix: served from the server's prompt cache
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_generate_input_fails_with_one_line(tiny_ckpt, tmp_path, capsys):
    def error(*args):
        with pytest.raises(SystemExit) as info:
            cli.main(["generate", "--model", str(tiny_ckpt), *args])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "the prompt is empty" in error("-p", "   ")
    long_prompt = "word " * 400  # the tiny model's context is 256 tokens
    assert "--truncate-prompt" in error("-p", long_prompt, "--ignore-chat-template")
    assert "does not exist" in error("--prompt-cache-file", str(tmp_path / "none.safetensors"))
    assert "no adapter_config.json" in error("--adapter-path", str(tmp_path))
    # LoRA adapters (mlx-lm format) trained for a model with hidden size 576, not 64:
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), {
        "model.layers.1.self_attn.q_proj.lora_a": mx.zeros((576, 4)),
        "model.layers.1.self_attn.q_proj.lora_b": mx.zeros((4, 576)),
    })
    assert "do not fit" in error("--adapter-path", str(tmp_path))


def test_prompt_longer_than_context_is_truncated_only_when_asked(tiny_ckpt):
    model, tokenizer = echo_mlx.load(str(tiny_ckpt))
    ids = list(range(300))
    assert gen.fit_prompt(ids, model, None, truncate=True) == ids[-256:]
    assert gen.fit_prompt(ids, model, max_kv_size=64, truncate=False) == ids
    with pytest.raises(EchoError):
        gen.fit_prompt(ids, model, None, truncate=False)


def test_kv_bits_8_keeps_greedy_tokens_of_the_unshared_model(smollm2):
    # Tolerance: 8-bit affine K/V (group 64) moves log-probs by at most 1.0
    # over 48 tokens on SmolLM2 (measured 0.42) and keeps every greedy token.
    # (Naively shared models are too chaotic for token equality: there we
    # check that consumers run on the producers' quantized caches below.)
    model = convert_in_memory(smollm2, "none")
    ids = smollm2.tokenizer.encode("The history of the Roman Empire began when", add_special_tokens=False)
    reference = greedy(model, ids, 48)
    cache = model.make_cache()
    quantized = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=48, prompt_cache=cache,
                                             kv_bits=8, kv_group_size=64, quantized_kv_start=0)]
    assert quantized == reference
    assert all(type(c).__name__ == "QuantizedKVCache" and c.bits == 8 for c in cache)


@pytest.mark.parametrize("plan", ["cla:2", "yoco"])
def test_kv_bits_consumers_attend_through_quantized_producer_caches(smollm2, plan):
    model = convert_in_memory(smollm2, plan)
    ids = smollm2.tokenizer.encode(PROMPT, add_special_tokens=False)
    cache = model.make_cache()
    out = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=16, prompt_cache=cache,
                                       kv_bits=4, kv_group_size=64, quantized_kv_start=0)]
    assert len(out) == 16 and len(cache) == 15
    assert all(c.bits == 4 for c in cache)
    unshared = convert_in_memory(smollm2, "none")
    full_cache = unshared.make_cache()
    list(generate_step(mx.array(ids), unshared, max_tokens=16, prompt_cache=full_cache,
                       kv_bits=4, kv_group_size=64, quantized_kv_start=0))
    assert kv_cache_bytes(cache) * 2 == kv_cache_bytes(full_cache)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_max_kv_size_bounds_resident_kv_and_generation_continues(smollm2, kv_bits):
    model = convert_in_memory(smollm2, "cla:2")
    ids = smollm2.tokenizer.encode("Once upon a time " * 10, add_special_tokens=False)  # 40 tokens
    window = 64
    cache = gen.make_prompt_cache(model, max_kv_size=window)
    sizes = []
    steps = generate_step(mx.array(ids), model, max_tokens=100, prompt_cache=cache,
                          kv_bits=kv_bits, kv_group_size=64, quantized_kv_start=50)
    for n, _ in enumerate(steps):
        sizes.append(kv_cache_bytes(cache))
    assert n + 1 == 100  # generation went on well past the window
    per_token = 2 * 3 * 64 * 4 * len(cache)  # K,V x kv heads x head dim x float32 x producers
    assert max(sizes[:5]) <= window * per_token
    assert sizes[-1] <= window * per_token  # bounded: 140 tokens seen, <= 64 kept
    assert len({c.offset for c in cache}) == 1 and cache[0].offset >= len(ids) + 99  # generate_step runs one ahead
    if kv_bits:
        assert all(type(c).__name__ == "QuantizedRotatingKVCache" for c in cache)
        assert sizes[-1] < window * per_token / 3  # 8-bit storage


def test_max_kv_size_is_refused_for_top_target_plans(smollm2):
    model = convert_in_memory(smollm2, "sandwich-top:15")
    with pytest.raises(EchoError, match="not supported with plans whose K/V producers sit above"):
        gen.make_prompt_cache(model, max_kv_size=64)


def test_bad_kv_options_fail_with_one_line(tiny_ckpt, capsys):
    for args, words in [(["--kv-bits", "3"], "--kv-bits 3 is not supported: use 4 or 8"),
                        (["--kv-bits", "4", "--kv-group-size", "48"], "group size 48")]:
        with pytest.raises(SystemExit) as info:
            cli.main(["generate", "--model", str(tiny_ckpt), "-p", "hi", *args])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("args, words", [
    (["--temp", "-0.5"], "--temp -0.5 is out of range: use a number >= 0"),
    (["--temp", "inf"], "--temp inf is out of range"),
    (["--top-p", "1.5"], "--top-p 1.5 is out of range: use a number in [0, 1]"),
    (["--top-p", "-0.1"], "--top-p -0.1 is out of range"),
    (["--min-p", "2"], "--min-p 2.0 is out of range: use a number in [0, 1]"),
    (["--min-p", "nan"], "--min-p nan is out of range"),
    (["--top-k", "-3"], "--top-k -3 is out of range: use an integer >= 0"),
    (["--max-tokens", "0"], "--max-tokens 0 is out of range: use an integer >= 1"),
    (["--seed", "-1"], "--seed -1 is out of range: use an integer >= 0"),
    (["--batch-size", "0", "--prompts-file", "p.txt"], "--batch-size 0 is out of range: use an integer >= 1"),
    (["--prefill-step-size", "0"], "--prefill-step-size 0 is out of range"),
])
def test_nonsense_sampling_values_fail_with_one_line_naming_the_range(tiny_ckpt, capsys, args, words):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", str(tiny_ckpt), "-p", "hi", *args])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_sampling_values_at_the_ends_of_their_ranges_are_accepted(tiny_ckpt, capsys):
    cli.main(["generate", "--model", str(tiny_ckpt), "-p", "hi", "-m", "2", "--temp", "0.7", "--top-p", "1",
              "--min-p", "0", "--top-k", "0", "--seed", "0", "--verbose", "False"])
    assert capsys.readouterr().err.strip() == ""
