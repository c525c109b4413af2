"""Decode attention over an affine-quantized K/V cache, dequantized in the loads.

mlx-lm's QuantizedKVCache stores keys and values as the `mx.quantize` tuple
(packed uint32 words, scales, biases): a row of D values is W = D * BITS / 32
words, value e of a word sits in bits [BITS e, BITS e + BITS), and each run of
GS values has one scale and one bias (value = scale * q + bias). mlx-lm's
quantized attention is two quantized_matmuls around a softmax, with the scores
in memory; MLX has no fused kernel for it. This kernel is the float one
(decode_attention.py: one threadgroup per (batch, kv head) group, online
softmax, same masks, same two-pass split and merge) with the loads replaced:
each packed word, scale and bias is read once per kv-head group and
dequantized in registers.

Lanes and keys: a lane holds whole words. A row has W words, so LPK = min(W,
32) lanes share a key and a SIMD group scores KPS = 32 / LPK keys at once;
each LPK-lane part of a SIMD group is a *walker* with its own softmax state
(its lanes reduce scores with shuffle_xor), merged with the others at the end.
Only the lane holding the first word of a quantization group loads the group's
scale and bias; the group's other lanes get them by shuffle.

Supported: 4 or 8 bits, group sizes 32/64/128 that divide D, head dims 32,
64, 128 and 256 (LPK must be a power of two that W is a multiple of).
"""

from typing import Optional

import mlx.core as mx

from . import decode_attention as da

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)

HEADER = """
// This lane's values of one row of an mx.quantize'd (packed, scales, biases)
// matrix: words sub + LPK * i (i < WL) of the row, BITS bits per value, low
// bits first, into out[WL * 32 / BITS]. The lane holding a quantization group's
// first word loads its scale and bias; the group's other lanes get them by
// shuffle. Every lane must call this (shuffles); lanes with live == false
// load nothing and get zeros. Pointers are at the row; strides innermost.
template <int BITS, int GS, int LPK, int WL, typename TS>
inline void dequantize_row(const device uint32_t* packed, int64_t packed_stride,
                           const device TS* scales, int64_t scale_stride,
                           const device TS* biases, int64_t bias_stride,
                           bool live, uint lane, thread float* out) {
  constexpr int E = 32 / BITS;    // values per word
  constexpr int WPG = GS / E;     // words per quantization group
  const int sub = lane % LPK;
  for (int i = 0; i < WL; i++) {
    const int w = sub + LPK * i;
    const uint word = live ? packed[w * packed_stride] : 0u;
    float2 scale_bias = float2(0.0f, 0.0f);
    if (live && w % WPG == 0) {
      scale_bias = float2(float(scales[(w / WPG) * scale_stride]), float(biases[(w / WPG) * bias_stride]));
    }
    scale_bias = simd_shuffle(scale_bias, lane - sub % WPG);
    for (int e = 0; e < E; e++) {
      out[i * E + e] = scale_bias.x * float((word >> (BITS * e)) & ((1u << BITS) - 1u)) + scale_bias.y;
    }
  }
}
"""

# Everything but the write of a finished row, as in decode_attention.ATTEND.
ATTEND = """
  constexpr int E = 32 / BITS;           // values per packed word
  constexpr int W = D / E;               // words per row
  constexpr int LPK = W < 32 ? W : 32;   // lanes per key
  constexpr int KPS = 32 / LPK;          // keys a SIMD group scores at once
  constexpr int WL = W / LPK;            // words per lane
  constexpr int EL = WL * E;             // values per lane
  constexpr int NW = NSG * KPS;          // walkers per threadgroup
  constexpr int R = G * LQ;              // query rows that share each K/V row
  static_assert(BITS == 4 || BITS == 8, "4 or 8 bits");
  static_assert(D % GS == 0 && GS % E == 0, "whole quantization groups per row");
  static_assert((LPK & (LPK - 1)) == 0 && W % LPK == 0 && LPK % (GS / E) == 0, "head dim 32, 64, 128 or 256");
  static_assert(NSG >= 1 && NSG <= 32, "1 to 32 SIMD groups per threadgroup");
  static_assert(G >= 1 && LQ >= 1 && R * EL <= 64, "too many query rows per thread: lower LQ");

  threadgroup float walker_max[NW][R];
  threadgroup float walker_sum[NW][R];
  threadgroup float walker_out[NW][D];

  const int sg = simdgroup_index_in_threadgroup;
  const int lane = thread_index_in_simdgroup;
  const int sub = lane % LPK;             // this lane's word in each LPK-word stripe of a row
  const int walker = sg * KPS + lane / LPK;
  const int tid = thread_index_in_threadgroup;
""" + da.KEY_RANGE + """
  // Load the queries: value j = i * E + e of a lane is d = (sub + LPK * i) * E + e.
  float qv[R][EL];
  float o[R][EL];
  float m[R];
  float s[R];
  for (int r = 0; r < R; r++) {
    const int l = l0 + r % LQ;
    const int64_t row = b * q_strides[0] + (h * G + r / LQ) * q_strides[1] + min(l, L - 1) * q_strides[2];
    for (int j = 0; j < EL; j++) {
      const int d = (sub + LPK * (j / E)) * E + j % E;
      qv[r][j] = l < L ? scale * float(q[row + d * q_strides[3]]) : 0.0f;
      o[r][j] = 0.0f;
    }
    m[r] = -INFINITY;
    s[r] = 0.0f;
  }

  // Score and accumulate: walker w of step n takes key first + n * NW + w;
  // the loop bound is the same for the whole SIMD group, so the shuffles are not
  // divergent, and walkers past `last` (not live) load nothing and add nothing.
  const int64_t k_base = b * k_strides[0] + h * k_strides[1];
  const int64_t ks_base = b * k_scales_strides[0] + h * k_scales_strides[1];
  const int64_t kb_base = b * k_biases_strides[0] + h * k_biases_strides[1];
  const int64_t v_base = b * v_strides[0] + h * v_strides[1];
  const int64_t vs_base = b * v_scales_strides[0] + h * v_scales_strides[1];
  const int64_t vb_base = b * v_biases_strides[0] + h * v_biases_strides[1];
  for (int t0 = first + sg * KPS; t0 <= last; t0 += NW) {
    const int t = t0 + lane / LPK;
    const bool live = t <= last;
    float x[EL];  // the key, then the value
    dequantize_row<BITS, GS, LPK, WL>(
        k + k_base + t * k_strides[2], k_strides[3],
        k_scales + ks_base + t * k_scales_strides[2], k_scales_strides[3],
        k_biases + kb_base + t * k_biases_strides[2], k_biases_strides[3], live, lane, x);
    float p[R];
    float rescale[R];
    for (int r = 0; r < R; r++) {
      float score = 0.0f;
      for (int j = 0; j < EL; j++) {
        score += qv[r][j] * x[j];
      }
      for (int delta = LPK / 2; delta > 0; delta /= 2) {
        score += simd_shuffle_xor(score, delta);  // the same sum in every lane of the walker
      }
      const bool visible = live && t >= row_lo[r % LQ] && t <= row_hi[r % LQ];
      p[r] = 0.0f;
      rescale[r] = 1.0f;
      if (!visible) {
        continue;
      }
      const float new_max = max(m[r], score);
      rescale[r] = fast::exp(m[r] - new_max);  // 0 while m[r] is -inf
      p[r] = fast::exp(score - new_max);
      s[r] = s[r] * rescale[r] + p[r];
      m[r] = new_max;
    }
    dequantize_row<BITS, GS, LPK, WL>(
        v + v_base + t * v_strides[2], v_strides[3],
        v_scales + vs_base + t * v_scales_strides[2], v_scales_strides[3],
        v_biases + vb_base + t * v_biases_strides[2], v_biases_strides[3], live, lane, x);
    for (int r = 0; r < R; r++) {
      for (int j = 0; j < EL; j++) {
        o[r][j] = o[r][j] * rescale[r] + p[r] * x[j];
      }
    }
  }

  // Merge the walkers' softmax states, then write, one row at a time.
  if (sub == 0) {
    for (int r = 0; r < R; r++) {
      walker_max[walker][r] = m[r];
      walker_sum[walker][r] = s[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < R; r++) {
    float row_max = -INFINITY;
    for (int j = 0; j < NW; j++) {
      row_max = max(row_max, walker_max[j][r]);
    }
    float row_sum = 0.0f;
    for (int j = 0; j < NW; j++) {
      row_sum += walker_max[j][r] == -INFINITY ? 0.0f : walker_sum[j][r] * fast::exp(walker_max[j][r] - row_max);
    }
    const float mine = m[r] == -INFINITY ? 0.0f : fast::exp(m[r] - row_max);
    for (int j = 0; j < EL; j++) {
      walker_out[walker][(sub + LPK * (j / E)) * E + j % E] = o[r][j] * mine;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int l = l0 + r % LQ;
    const int q_row = (b * Hq + h * G + r / LQ) * L + l;  // row of the (B, Hq, L) outputs
    if (l < L) {
      for (int d = tid; d < D; d += NSG * 32) {
        float acc = 0.0f;
        for (int j = 0; j < NW; j++) {
          acc += walker_out[j][d];
        }
        // <write row>
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
"""

INPUTS = ["q", "k", "k_scales", "k_biases", "v", "v_scales", "v_biases", "scale", "mask_params"]


def values_per_lane(head_dim: int, bits: int, group_size: int) -> int:
    """EL of the kernel; raises ValueError (with the reason) for what it does not support."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit K/V is not supported by the kernel (4 or 8 bits)")
    if group_size not in SUPPORTED_GROUP_SIZES or head_dim % group_size:
        raise ValueError(f"quantization group size {group_size} does not divide head dim {head_dim} "
                         f"into whole groups of 32, 64 or 128")
    per_word = 32 // bits
    words = head_dim // per_word
    lanes_per_key = min(words, 32)
    if head_dim % per_word or lanes_per_key & (lanes_per_key - 1) or words % lanes_per_key:
        raise ValueError(f"head dim {head_dim} is not supported by the quantized kernel (32, 64, 128 or 256)")
    return words // lanes_per_key * per_word


def plan(q_shape, packed_shape, *, bits: int, group_size: int, **options) -> da.Plan:
    """decode_attention.plan for packed keys of shape (B, Hkv, T, D * bits / 32)."""
    B, Hkv, T, words = packed_shape
    D = q_shape[3]
    if words * 32 != D * bits:
        raise ValueError(f"packed keys {tuple(packed_shape)} do not hold {bits}-bit rows of head dim {D}")
    lane_values = values_per_lane(D, bits, group_size)
    return da.plan(q_shape, (B, Hkv, T, D), lane_values=lane_values, **options)


def build(factory=None, simd_groups: int = 8):
    """The quantized decode attention callable, with kernels made by `factory`
    (mx.fast.metal_kernel by default; mslsim.metal_kernel on Linux tests)."""
    factory = factory or mx.fast.metal_kernel
    common = dict(input_names=INPUTS, header=da.HEADER + HEADER, ensure_row_contiguous=False)
    single = factory(name="echo_quantized_decode_attention", output_names=["out"],
                     source=ATTEND.replace("// <write row>", da.WRITE_OUTPUT), **common)
    blocks = factory(name="echo_quantized_decode_attention_blocks", output_names=["partials", "maxs", "sums"],
                     source=ATTEND.replace("// <write row>", da.WRITE_BLOCK), **common)
    merge = factory(name="echo_decode_attention_merge", input_names=["partials", "maxs", "sums"],
                    output_names=["out"], source=da.MERGE)

    def quantized_decode_attention(q, k, v, *, scale: float, bits: int, group_size: int,
                                   mask_kind: str = "causal", window: Optional[int] = None,
                                   offset: Optional[int] = None, keys_per_block: Optional[int] = None,
                                   simd_groups: int = simd_groups):
        """softmax(scale q k^T + mask) v for q (B, Hq, L, D) and k, v the
        `mx.quantize(x, group_size, bits)` tuples of (B, Hkv, T, D) keys and
        values: packed (B, Hkv, T, D * bits / 32) uint32, scales and biases
        (B, Hkv, T, D / group_size). Masks and `offset` as in decode_attention;
        the tuples may be strided views (the valid part of QuantizedKVCache's
        buffers)."""
        shapes = [tuple(a.shape) for a in (*k, *v)]
        if len(k) != 3 or len(v) != 3 or shapes[:3] != shapes[3:] or shapes[1] != shapes[2]:
            raise ValueError(f"keys and values must be (packed, scales, biases) tuples of the same shapes, not {shapes}")
        p = plan(q.shape, k[0].shape, bits=bits, group_size=group_size, mask_kind=mask_kind, window=window,
                 offset=offset, keys_per_block=keys_per_block)
        if shapes[1] != (*shapes[0][:3], q.shape[3] // group_size):
            raise ValueError(f"scales {shapes[1]} do not fit group size {group_size} for head dim {q.shape[3]}")
        template = [("T", q.dtype), ("D", q.shape[3]), ("BITS", bits), ("GS", group_size),
                    ("G", p.group_size), ("LQ", p.queries_per_group), ("NSG", simd_groups)]
        return da.launch((single, blocks, merge), [*k, *v], template, p, q, scale, simd_groups)

    return quantized_decode_attention
