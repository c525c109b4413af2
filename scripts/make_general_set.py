"""Continue the built-in openings with the original model: echo_mlx/datasets/generaldata/samples.jsonl.

    python scripts/make_general_set.py [--max-tokens 256] [--temp 0.8] [--top-p 0.95] [--seed 0]

Reads ``echo_mlx/datasets/generaldata/openings.jsonl`` (openings written for this
project, 33 genres), tokenizes each as plain text (no chat template, no BOS:
the corpus's protocol), and samples the original's continuation, batched
through mlx-lm's BatchGenerator. Sampled rather than greedy: greedy
continuations of a small model loop, and a sample at a temperature below 1 is
text the model finds likely without repeating itself. Writes one record per
opening: ``{"id", "genre", "split", "opening", "continuation"}``. Run once;
the result ships as data, so nothing is generated at training or test time.

    python scripts/make_general_set.py --extra-draws 2 [--seed 1]

appends further continuations of the *training* openings only (``"draw": 1, 2, ...``),
sampled the same way with another seed, and leaves every record already in the
file as it is: more of the teacher's own text to distil on, while the
validation and held-out samples (and what was measured on them) stay the same.
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
from echo_mlx.datasets import general
from echo_mlx.generate import generate_batch, sampler_from


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=35)
    parser.add_argument("--out", default=str(general.SAMPLES_FILE))
    parser.add_argument("--extra-draws", type=int, default=0,
                        help="append this many more continuations of each training opening to --out")
    args = parser.parse_args()

    out = Path(args.out)
    if args.extra_draws:  # more continuations of the training openings, after the records already there
        kept = general.read_shipped_jsonl(out, "the general set")
        first = max(r.get("draw", 0) for r in kept) + 1
        train = [o for o in general.read_openings() if general.split_of(o["id"]) == "train"]
        jobs = [(draw, o) for draw in range(first, first + args.extra_draws) for o in train]
        what = f"{len(jobs)} continuations ({args.extra_draws} more of each of {len(train)} training openings)"
    else:
        kept, jobs = [], [(0, o) for o in general.read_openings()]
        what = f"{len(jobs)} openings"
    model, tokenizer = load(args.model, plan="none")
    ids = [tokenizer.encode(o["opening"], add_special_tokens=False) for _, o in jobs]
    print(f"{what}; temp {args.temp}, top-p {args.top_p}, seed {args.seed}, max {args.max_tokens} tokens, batch "
          f"{args.batch_size}; mlx {mx.__version__}, {platform.machine()}, BLAS {blas.status()}", flush=True)
    mx.random.seed(args.seed)
    tic = time.perf_counter()
    texts, _ = generate_batch(model, tokenizer, ids, max_tokens=args.max_tokens,
                              sampler=sampler_from(args.temp, args.top_p, 0, 0.0), max_kv_size=None,
                              batch_size=args.batch_size)
    seconds = time.perf_counter() - tic
    records = [{"id": o["id"], "genre": o["genre"], "split": general.split_of(o["id"]), **({"draw": draw} if draw else {}),
                "opening": o["opening"], "continuation": text} for (draw, o), text in zip(jobs, texts)]
    write(out, kept + records, tokenizer, seconds)


def write(out: Path, records, tokenizer, seconds: float):
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out)
    tokens = sum(len(tokenizer.encode(general.text(r), add_special_tokens=False)) for r in records)
    print(f"wrote {out}: {len(records)} samples, {tokens:,} tokens in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
