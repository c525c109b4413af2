"""Answer the built-in chat prompts with the original model: echo_mlx/chatdata/chat.jsonl.

    python scripts/make_chat_set.py [--max-tokens 256] [--batch-size 32]

Reads ``echo_mlx/chatdata/prompts.jsonl`` (prompts written for this project),
renders each through the original model's chat template (its default system
prompt, as `echo-mlx generate` does), and generates the original's greedy
answer, batched through mlx-lm's BatchGenerator. Writes one mlx-lm chat record
per prompt: ``{"id", "category", "split", "finished", "messages"}``. The
split (echo_mlx.datasets.chat.split_of) is fixed by the prompt's id. Run once; the
result ships as data, so nothing is generated at training or test time.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import echo_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
import mlx.core as mx

from echo_mlx import blas
from echo_mlx.api import load
from echo_mlx.datasets import chat
from echo_mlx.generate import generate_batch, sampler_from


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(chat.CHAT_FILE))
    args = parser.parse_args()

    prompts = chat.read_prompts()
    model, tokenizer = load(args.model, plan="none")
    ids = [chat.prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    print(f"{len(prompts)} prompts; greedy, max {args.max_tokens} tokens, batch {args.batch_size}; "
          f"mlx {mx.__version__}, {platform.machine()}, BLAS {blas.status()}", flush=True)
    tic = time.perf_counter()
    texts, _ = generate_batch(model, tokenizer, ids, max_tokens=args.max_tokens, sampler=sampler_from(0.0, 1.0, 0, 0.0),
                              max_kv_size=None, batch_size=args.batch_size)
    seconds = time.perf_counter() - tic
    records = []
    for p, text in zip(prompts, texts):
        answer_ids = tokenizer.encode(text, add_special_tokens=False)
        records.append({
            "id": p["id"], "category": p["category"], "split": chat.split_of(p["id"]),
            "finished": len(answer_ids) < args.max_tokens,
            "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": text.strip()}],
        })
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out)
    tokens = sum(len(tokenizer.encode(r["messages"][1]["content"], add_special_tokens=False)) for r in records)
    print(f"wrote {out}: {len(records)} answers, {tokens:,} answer tokens in {seconds / 60:.1f} min; "
          f"{sum(not r['finished'] for r in records)} stopped at --max-tokens")


if __name__ == "__main__":
    main()
