"""The teacher's work on a batch, computed once and kept on disk (``--teacher-cache DIR``).

Distillation runs the original model on every batch: a full forward pass and
a softmax over the 49k-entry vocabulary, about a third of a CPU step, and the
layer-wise phase runs the whole teacher to read a few layers' states. Whenever
a batch comes round again (a second epoch, a resumed or repeated run, the same
batches for another plan or another start in a benchmark) that work is the
same, so it is kept, one file per batch:

- for KD, the teacher's distribution at the run's temperature as its ``k``
  likeliest tokens (ids, log-probabilities) and the mass of the rest
  (echo_mlx.tuner.distill.top_k_statistics; the loss is then sparse_kl, the KL
  of the distributions coarsened to k + 1 outcomes). 512 KiB per 4 x 256 batch
  at k = 64, instead of 192 MiB for the full distribution;
- for the layer-wise phase, the residual-stream states it reads, float32 as
  computed (the loss from the cache is the uncached loss exactly).

Files are named by a hash of the teacher's fingerprint, what is kept (k and
the temperature, or the layers) and the batch's tokens, so another teacher,
setting or batch never matches, and are written atomically; an unreadable file
is recomputed and rewritten. A miss returns the teacher's outputs unevaluated,
so they are computed within the training step, overlapping the student's work
as the uncached teacher's do; they are written at the next lookup (by then the
step has evaluated them) or at ``flush()``.
"""

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..generate import model_fingerprint
from .distill import top_k_statistics


class TeacherCache:
    def __init__(self, directory, teacher, *, top_k: int = 64, temperature: float = 1.0):
        from ..errors import EchoError

        if top_k < 1:
            raise EchoError(f"--teacher-top-k {top_k} must be at least 1 (e.g. 64)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.teacher, self.k, self.temperature = teacher, top_k, temperature
        self.fingerprint = model_fingerprint(teacher)
        self.hits = self.misses = 0
        self._pending = []  # (path, {name: array}) computed by a step, not yet written

    def _path(self, kind: str, what, inputs: mx.array) -> Path:
        h = hashlib.sha256(f"{self.fingerprint}|{kind}|{what}|{inputs.shape}".encode())
        h.update(np.asarray(inputs, dtype=np.int32).tobytes())
        return self.directory / f"{kind}-{h.hexdigest()[:24]}.safetensors"

    def flush(self):
        """Write the entries of earlier misses (evaluating them if no step has)."""
        for path, arrays in self._pending:
            mx.eval(list(arrays.values()))
            tmp = path.with_name(f".{path.name}.tmp.safetensors")
            mx.save_safetensors(str(tmp), arrays)
            tmp.replace(path)
        self._pending = []

    def _lookup(self, path: Path, names: Sequence[str], compute):
        self.flush()
        if path.exists():
            try:
                found = mx.load(str(path))
                if all(n in found for n in names):
                    self.hits += 1
                    return [found[n] for n in names]
            except Exception as e:  # a damaged file is only lost work: recompute it
                warnings.warn(f"teacher cache file {path} is unreadable ({e}); recomputing it")
        self.misses += 1
        arrays = compute()
        self._pending.append((path, dict(zip(names, arrays))))
        return arrays

    def top_k(self, inputs: mx.array):
        """(ids, log-probabilities, tail mass) of the teacher's next-token distributions on ``inputs``."""
        path = self._path("kd", (self.k, self.temperature), inputs)
        return tuple(self._lookup(path, ("ids", "log_p", "tail"),
                                  lambda: list(top_k_statistics(self.teacher(inputs), self.temperature, self.k))))

    def states(self, inputs: mx.array, layers: Sequence[int]) -> dict:
        """{j: the teacher's residual stream entering layer j} for j in ``layers`` (L = after the last)."""
        from .layerwise import teacher_states

        layers = sorted(set(layers))
        path = self._path("states", layers, inputs)
        names = [f"h{j}" for j in layers]

        def compute():
            states = teacher_states(self.teacher, inputs, upto=layers[-1])  # no layer above the last needed
            return [states[j] for j in layers]

        return dict(zip(layers, self._lookup(path, names, compute)))
