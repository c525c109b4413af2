"""Decode attention over a producer's K/V cache, one K/V read per kv-head group.

Queries (B, Hq, L, D) with L small (decode, speculative decode: 1..8)
attend to a cache (B, Hkv, T, D). MLX's sdpa_vector runs one threadgroup per
query head and position, so each of the G = Hq / Hkv heads of a group reads
the same K/V rows again. Here one threadgroup serves a whole (batch, kv head)
group: every K and V row is loaded once and used for all G x L query rows.

Layout of the work:
  grid.x  key blocks (one unless the visible keys are many: two passes)
  grid.y  batch x kv head
  grid.z  chunks of LQ query positions (one unless G x L rows would not fit
          in registers)
  SIMD groups take every NSG-th key; the 32 lanes of a SIMD group split the
  head dimension (lane + 32 i), so loads are coalesced and any D works.

Masks, with pos = q_offset + l the position of query l:
  causal       keys t <= pos
  no_diagonal  keys t <= pos - 1 (the producer sits above the consumer; a
               query that sees no key outputs zeros)
  none         every key
  window=w     additionally t > pos - w (sliding window)

The MSL lives in Python constants; `build(factory)` makes the kernels with
mx.fast.metal_kernel, or with mslsim.metal_kernel in the tests (same
signature, runs on the CPU).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

MASK_KINDS = ("causal", "no_diagonal", "none")
SUPPORTED_HEAD_DIMS = range(32, 257)
# q and o accumulators per lane: R x ceil(D / 32) floats each.
ROW_BUDGET = 32
# Up to this many visible keys one pass suffices; beyond, key blocks of
# about KEYS_PER_BLOCK keys run in parallel and a second kernel merges them.
SINGLE_PASS_KEYS = 512
KEYS_PER_BLOCK = 256
MAX_BLOCKS = 128

HEADER = """
// Visible keys of the query at position `pos` are [key_lo, key_hi] (maybe empty).
// mask: q_offset, causal, skip_diagonal, window, key_start, keys_per_block.
inline int key_hi(int pos, int n_keys, const constant int* mask) {
  return mask[1] ? metal::min(n_keys - 1, pos - mask[2]) : n_keys - 1;
}
inline int key_lo(int pos, const constant int* mask) {
  return mask[3] > 0 ? metal::max(0, pos - mask[3] + 1) : 0;
}
"""

# The threadgroup's (batch, kv head, query chunk) and the keys it walks: shared
# by the float and quantized kernels.
KEY_RANGE = """
  const int Hkv = k_shape[1];
  const int n_keys = k_shape[2];
  const int L = q_shape[2];
  const int Hq = Hkv * G;
  const int block = threadgroup_position_in_grid.x;
  const int b = threadgroup_position_in_grid.y / Hkv;
  const int h = threadgroup_position_in_grid.y % Hkv;
  const int l0 = threadgroup_position_in_grid.z * LQ;
  const int q_offset = mask_params[0];

  // Visible keys per query position of this chunk; empty past the last query.
  int row_lo[LQ];
  int row_hi[LQ];
  for (int lq = 0; lq < LQ; lq++) {
    const int pos = q_offset + l0 + lq;
    row_lo[lq] = l0 + lq < L ? key_lo(pos, mask_params) : 1;
    row_hi[lq] = l0 + lq < L ? key_hi(pos, n_keys, mask_params) : 0;
  }

  // Keys of this threadgroup: its block, cut to what its queries can see.
  const int l_last = min(l0 + LQ, L) - 1 - l0;
  const int block_start = mask_params[4] + block * mask_params[5];
  const int first = max(block_start, row_lo[0]);
  const int last = min(block_start + mask_params[5] - 1, row_hi[l_last]);
"""

# Everything but the write of a finished row. `// <write row>` is replaced by
# the single-pass or the key-block epilogue.
ATTEND = """
  constexpr int DL = (D + 31) / 32;  // head-dim elements per lane
  constexpr int R = G * LQ;          // query rows that share each K/V row
  static_assert(NSG >= 1 && NSG <= 32, "1 to 32 SIMD groups per threadgroup");
  static_assert(D >= 32 && D <= 256, "head dim 32 to 256");
  static_assert(G >= 1 && LQ >= 1 && R * DL <= 64, "too many query rows per thread: lower LQ");

  threadgroup float group_max[NSG][R];
  threadgroup float group_sum[NSG][R];
  threadgroup float group_out[NSG][D];

  const int sg = simdgroup_index_in_threadgroup;
  const int lane = thread_index_in_simdgroup;
  const int tid = thread_index_in_threadgroup;
""" + KEY_RANGE + """
  // Load the queries. Row r is head h * G + r / LQ at position l0 + r % LQ.
  float qv[R][DL];
  float o[R][DL];
  float m[R];
  float s[R];
  for (int r = 0; r < R; r++) {
    const int l = l0 + r % LQ;
    const int64_t row = b * q_strides[0] + (h * G + r / LQ) * q_strides[1] + min(l, L - 1) * q_strides[2];
    for (int i = 0; i < DL; i++) {
      const int d = lane + 32 * i;
      qv[r][i] = (l < L && d < D) ? scale * float(q[row + d * q_strides[3]]) : 0.0f;
      o[r][i] = 0.0f;
    }
    m[r] = -INFINITY;
    s[r] = 0.0f;
  }

  // Score and accumulate: each K/V row is loaded once, for all R rows,
  // with an online (running max) softmax in fp32.
  const int64_t k_base = b * k_strides[0] + h * k_strides[1];
  const int64_t v_base = b * v_strides[0] + h * v_strides[1];
  for (int t = first + sg; t <= last; t += NSG) {
    float kr[DL];
    for (int i = 0; i < DL; i++) {
      const int d = lane + 32 * i;
      kr[i] = d < D ? float(k[k_base + t * k_strides[2] + d * k_strides[3]]) : 0.0f;
    }
    float p[R];
    float rescale[R];
    for (int r = 0; r < R; r++) {
      // The same for every lane of the SIMD group, so simd_sum is not divergent.
      const bool visible = t >= row_lo[r % LQ] && t <= row_hi[r % LQ];
      p[r] = 0.0f;
      rescale[r] = 1.0f;
      if (!visible) {
        continue;
      }
      float score = 0.0f;
      for (int i = 0; i < DL; i++) {
        score += qv[r][i] * kr[i];
      }
      score = simd_sum(score);
      const float new_max = max(m[r], score);
      rescale[r] = fast::exp(m[r] - new_max);  // 0 while m[r] is -inf
      p[r] = fast::exp(score - new_max);
      s[r] = s[r] * rescale[r] + p[r];
      m[r] = new_max;
    }
    for (int i = 0; i < DL; i++) {
      const int d = lane + 32 * i;
      const float vd = d < D ? float(v[v_base + t * v_strides[2] + d * v_strides[3]]) : 0.0f;
      for (int r = 0; r < R; r++) {
        o[r][i] = o[r][i] * rescale[r] + p[r] * vd;
      }
    }
  }

  // Merge the SIMD groups' softmax states, then write, one row at a time.
  if (lane == 0) {
    for (int r = 0; r < R; r++) {
      group_max[sg][r] = m[r];
      group_sum[sg][r] = s[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < R; r++) {
    float row_max = -INFINITY;
    for (int j = 0; j < NSG; j++) {
      row_max = max(row_max, group_max[j][r]);
    }
    float row_sum = 0.0f;
    for (int j = 0; j < NSG; j++) {
      row_sum += group_max[j][r] == -INFINITY ? 0.0f : group_sum[j][r] * fast::exp(group_max[j][r] - row_max);
    }
    const float mine = m[r] == -INFINITY ? 0.0f : fast::exp(m[r] - row_max);
    for (int i = 0; i < DL; i++) {
      const int d = lane + 32 * i;
      if (d < D) {
        group_out[sg][d] = o[r][i] * mine;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int l = l0 + r % LQ;
    const int q_row = (b * Hq + h * G + r / LQ) * L + l;  // row of the (B, Hq, L) outputs
    if (l < L) {
      for (int d = tid; d < D; d += NSG * 32) {
        float acc = 0.0f;
        for (int j = 0; j < NSG; j++) {
          acc += group_out[j][d];
        }
        // <write row>
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
"""

WRITE_OUTPUT = "out[int64_t(q_row) * D + d] = T(row_sum > 0.0f ? acc / row_sum : 0.0f);"

WRITE_BLOCK = """const int n_blocks = threadgroups_per_grid.x;
        partials[(int64_t(q_row) * n_blocks + block) * D + d] = acc;
        if (d == 0) {
          maxs[q_row * n_blocks + block] = row_max;
          sums[q_row * n_blocks + block] = row_sum;
        }"""

# Second pass: one thread per (query row, d) merges the key blocks.
MERGE = """
  const int n_blocks = maxs_shape[3];
  const int d = thread_position_in_grid.x;
  const int row = thread_position_in_grid.y;
  if (d >= D) {
    return;
  }
  float row_max = -INFINITY;
  for (int j = 0; j < n_blocks; j++) {
    row_max = max(row_max, maxs[row * n_blocks + j]);
  }
  float total = 0.0f;
  float acc = 0.0f;
  for (int j = 0; j < n_blocks; j++) {
    const float block_max = maxs[row * n_blocks + j];
    if (block_max == -INFINITY) {
      continue;  // the block saw no key
    }
    const float w = fast::exp(block_max - row_max);
    total += sums[row * n_blocks + j] * w;
    acc += partials[(int64_t(row) * n_blocks + j) * D + d] * w;
  }
  out[int64_t(row) * D + d] = T(total > 0.0f ? acc / total : 0.0f);
"""

ATTEND_INPUTS = ["q", "k", "v", "scale", "mask_params"]


@dataclass(frozen=True)
class Plan:
    """How one call is laid out; pure arithmetic on shapes, see `plan`."""

    group_size: int  # G = Hq / Hkv
    queries_per_group: int  # LQ
    query_chunks: int
    key_start: int
    keys_per_block: int
    blocks: int
    mask_params: tuple

    @property
    def two_pass(self) -> bool:
        return self.blocks > 1


def key_range(pos: int, n_keys: int, mask_kind: str, window: Optional[int]):
    """[lo, hi] of the keys the query at `pos` sees (the kernel's key_lo/key_hi)."""
    hi = n_keys - 1 if mask_kind == "none" else min(n_keys - 1, pos - (mask_kind == "no_diagonal"))
    lo = max(0, pos - window + 1) if window else 0
    return lo, hi


def default_keys_per_block(visible: int) -> int:
    """One block up to SINGLE_PASS_KEYS keys; beyond, blocks of at least KEYS_PER_BLOCK, at most MAX_BLOCKS of them."""
    return visible if visible <= SINGLE_PASS_KEYS else max(KEYS_PER_BLOCK, -(-visible // MAX_BLOCKS))


def plan(q_shape, k_shape, *, mask_kind="causal", window=None, offset=None, keys_per_block=None,
         lane_values=None) -> Plan:
    """The layout of one call; `lane_values` is how many head-dim values one
    lane holds per query row (default ceil(D / 32), the float kernel's)."""
    B, Hq, L, D = q_shape
    Bk, Hkv, n_keys, Dk = k_shape
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, not {mask_kind!r}")
    if (B, D) != (Bk, Dk) or Hq % Hkv:
        raise ValueError(f"queries {tuple(q_shape)} do not fit keys {tuple(k_shape)}: need the same batch and "
                         "head dim, and query heads a multiple of kv heads")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is outside 32..256")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of keys, not {window}")
    offset = n_keys - L if offset is None else offset
    G = Hq // Hkv
    lanes = lane_values or (D + 31) // 32
    LQ = max(1, min(L, ROW_BUDGET // (G * lanes)))
    if G * LQ * lanes > 64:
        raise ValueError(f"{G} query heads per kv head at head dim {D} need too many registers")
    lo, _ = key_range(offset, n_keys, mask_kind, window)
    _, hi = key_range(offset + L - 1, n_keys, mask_kind, window)
    visible = max(0, hi - lo + 1)
    keys_per_block = max(1, default_keys_per_block(visible) if keys_per_block is None else keys_per_block)
    blocks = max(1, -(-visible // keys_per_block))
    mask = (offset, int(mask_kind != "none"), int(mask_kind == "no_diagonal"), window or 0, lo, keys_per_block)
    return Plan(G, LQ, -(-L // LQ), lo, keys_per_block, blocks, mask)


def build(factory=None, simd_groups: int = 8):
    """The decode attention callable, with kernels made by `factory`
    (mx.fast.metal_kernel by default; mslsim.metal_kernel on Linux tests)."""
    factory = factory or mx.fast.metal_kernel
    common = dict(input_names=ATTEND_INPUTS, header=HEADER, ensure_row_contiguous=False)
    single = factory(name="echo_decode_attention", output_names=["out"],
                     source=ATTEND.replace("// <write row>", WRITE_OUTPUT), **common)
    blocks = factory(name="echo_decode_attention_blocks", output_names=["partials", "maxs", "sums"],
                     source=ATTEND.replace("// <write row>", WRITE_BLOCK), **common)
    merge = factory(name="echo_decode_attention_merge", input_names=["partials", "maxs", "sums"],
                    output_names=["out"], source=MERGE)

    def decode_attention(q, k, v, *, scale: float, mask_kind: str = "causal", window: Optional[int] = None,
                         offset: Optional[int] = None, keys_per_block: Optional[int] = None,
                         simd_groups: int = simd_groups):
        """softmax(scale q k^T + mask) v for q (B, Hq, L, D), k and v (B, Hkv, T, D).

        `offset` is the position of the first query (default T - L, the
        queries are the newest tokens). K and V may be strided views, such as
        the valid part of a preallocated cache; the head dim must be innermost.
        """
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")
        p = plan(q.shape, k.shape, mask_kind=mask_kind, window=window, offset=offset, keys_per_block=keys_per_block)
        template = [("T", q.dtype), ("D", q.shape[3]), ("G", p.group_size), ("LQ", p.queries_per_group),
                    ("NSG", simd_groups)]
        return launch((single, blocks, merge), [k, v], template, p, q, scale, simd_groups)

    return decode_attention


def launch(kernels, cache_inputs, template, p: Plan, q, scale, simd_groups):
    """Run one attention call laid out by `p`: the single-pass kernel, or the
    key-block kernel and the merge. Shared with the quantized kernel, whose
    kernels take the same q, scale and mask_params around their cache inputs."""
    single, blocks, merge = kernels
    B, Hq, L, D = q.shape
    Hkv = Hq // p.group_size
    inputs = [q, *cache_inputs, float(scale), mx.array(p.mask_params, dtype=mx.int32)]
    threads = 32 * simd_groups
    grid = (threads * p.blocks, B * Hkv, p.query_chunks)
    if not p.two_pass:
        return single(inputs=inputs, template=template, grid=grid, threadgroup=(threads, 1, 1),
                      output_shapes=[(B, Hq, L, D)], output_dtypes=[q.dtype])[0]
    partials, maxs, sums = blocks(
        inputs=inputs, template=template, grid=grid, threadgroup=(threads, 1, 1),
        output_shapes=[(B, Hq, L, p.blocks, D), (B, Hq, L, p.blocks), (B, Hq, L, p.blocks)],
        output_dtypes=[mx.float32] * 3)
    return merge(inputs=[partials, maxs, sums], template=[("T", q.dtype), ("D", D)],
                 grid=(D, B * Hq * L, 1), threadgroup=(D, 1, 1),
                 output_shapes=[(B, Hq, L, D)], output_dtypes=[q.dtype])[0]
