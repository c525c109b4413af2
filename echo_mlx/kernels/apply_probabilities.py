"""P V for EchoAtt layers that reuse their source's attention probabilities.

A reusing layer's attention is its source's probabilities P (B, Hkv, G, L, S),
grouped by kv head as the model keeps them, times its own values V (B, Hkv,
S, D): no scores, no softmax, no keys. As in decode_attention.py, one
threadgroup serves a whole (batch, kv head) group, so every V row is loaded
once for all G x L query rows; lane r of a SIMD group loads row r's
probability of the key and shuffles it to the others, so P too is read once.
Masked keys have probability 0 (the softmax wrote them), so there is no mask.
With a quantized cache (``--kv-bits``), V is the mx.quantize tuple and each
packed word, scale and bias is read once per kv-head group and dequantized in
registers, with the lanes-per-key walkers of quantized_decode_attention.py.

Layout of the work:
  grid.x  key blocks (one unless the keys are many: partial sums, then a
          second kernel adds them up)
  grid.y  batch x kv head
  grid.z  chunks of LQ query positions
  SIMD groups take every NSG-th key of the block; the 32 lanes split the
  head dimension (lane + 32 i).
"""

from dataclasses import dataclass

import mlx.core as mx

from . import decode_attention as da
from . import quantized_decode_attention as qa

# q rows that share a V row must fit one probability per lane.
MAX_ROWS = 32

# The threadgroup's (batch, kv head, query chunk) and its keys [first, last]:
# shared by the float and quantized kernels.
KEY_BLOCK = """
  const int Hkv = v_shape[1];
  const int n_keys = v_shape[2];
  const int L = p_shape[3];
  const int Hq = Hkv * G;
  const int block = threadgroup_position_in_grid.x;
  const int b = threadgroup_position_in_grid.y / Hkv;
  const int h = threadgroup_position_in_grid.y % Hkv;
  const int l0 = threadgroup_position_in_grid.z * LQ;
  const int first = block * keys_per_block;
  const int last = min(first + keys_per_block, n_keys) - 1;
"""

APPLY = """
  constexpr int DL = (D + 31) / 32;  // head-dim elements per lane
  constexpr int R = G * LQ;          // query rows that share each V row
  static_assert(NSG >= 1 && NSG <= 32, "1 to 32 SIMD groups per threadgroup");
  static_assert(D >= 1 && D <= 256, "head dim 1 to 256");
  static_assert(R >= 1 && R <= 32, "at most 32 query rows per threadgroup: lower LQ");

  threadgroup float group_out[NSG][D];

""" + KEY_BLOCK + """
  const int sg = simdgroup_index_in_threadgroup;
  const int lane = thread_index_in_simdgroup;
  const int tid = thread_index_in_threadgroup;

  // Lane r < R loads row r's probability: query head h * G + r / LQ, position l0 + r % LQ.
  const int my_l = l0 + lane % LQ;
  const bool my_row = lane < R && my_l < L;
  const int64_t p_row = b * p_strides[0] + h * p_strides[1] + (lane / LQ % G) * p_strides[2]
                        + min(my_l, L - 1) * p_strides[3];
  const int64_t v_base = b * v_strides[0] + h * v_strides[1];

  float o[R][DL];
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < DL; i++) {
      o[r][i] = 0.0f;
    }
  }
  for (int t = first + sg; t <= last; t += NSG) {
    const float mine = my_row ? float(p[p_row + t * p_strides[4]]) : 0.0f;
    float vr[DL];
    for (int i = 0; i < DL; i++) {
      const int d = lane + 32 * i;
      vr[i] = d < D ? float(v[v_base + t * v_strides[2] + d * v_strides[3]]) : 0.0f;
    }
    for (int r = 0; r < R; r++) {
      const float pr = simd_shuffle(mine, r);
      for (int i = 0; i < DL; i++) {
        o[r][i] += pr * vr[i];
      }
    }
  }

  // Sum the SIMD groups' rows, one row at a time.
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < DL; i++) {
      const int d = lane + 32 * i;
      if (d < D) {
        group_out[sg][d] = o[r][i];
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

# Quantized V: a walker of LPK lanes takes one key at a time (qa.ATTEND's layout);
# lane `sub` of a walker loads rows sub, sub + LPK, ... of the key's probabilities.
APPLY_QUANTIZED = """
  constexpr int E = 32 / BITS;           // values per packed word
  constexpr int W = D / E;               // words per row
  constexpr int LPK = W < 32 ? W : 32;   // lanes per key
  constexpr int KPS = 32 / LPK;          // keys a SIMD group takes at once
  constexpr int WL = W / LPK;            // words per lane
  constexpr int EL = WL * E;             // values per lane
  constexpr int NW = NSG * KPS;          // walkers per threadgroup
  constexpr int R = G * LQ;              // query rows that share each V row
  constexpr int RL = (R + LPK - 1) / LPK;  // probabilities a lane loads per key
  static_assert(BITS == 4 || BITS == 8, "4 or 8 bits");
  static_assert(D % GS == 0 && GS % E == 0, "whole quantization groups per row");
  static_assert((LPK & (LPK - 1)) == 0 && W % LPK == 0 && LPK % (GS / E) == 0, "head dim 32, 64, 128 or 256");
  static_assert(NSG >= 1 && NSG <= 32, "1 to 32 SIMD groups per threadgroup");
  static_assert(R >= 1 && R * EL <= 64, "too many query rows per thread: lower LQ");

  threadgroup float walker_out[NW][D];

""" + KEY_BLOCK + """
  const int sg = simdgroup_index_in_threadgroup;
  const int lane = thread_index_in_simdgroup;
  const int sub = lane % LPK;
  const int walker = sg * KPS + lane / LPK;
  const int walker_lane0 = lane - sub;
  const int tid = thread_index_in_threadgroup;

  const int64_t p_base = b * p_strides[0] + h * p_strides[1];
  const int64_t v_base = b * v_strides[0] + h * v_strides[1];
  const int64_t vs_base = b * v_scales_strides[0] + h * v_scales_strides[1];
  const int64_t vb_base = b * v_biases_strides[0] + h * v_biases_strides[1];

  float o[R][EL];
  for (int r = 0; r < R; r++) {
    for (int j = 0; j < EL; j++) {
      o[r][j] = 0.0f;
    }
  }
  for (int t0 = first + sg * KPS; t0 <= last; t0 += NW) {
    const int t = t0 + lane / LPK;
    const bool live = t <= last;
    float mine[RL];
    for (int i = 0; i < RL; i++) {
      const int r = sub + LPK * i;  // query head h * G + r / LQ, position l0 + r % LQ
      const int l = l0 + r % LQ;
      mine[i] = (live && r < R && l < L)
          ? float(p[p_base + (r / LQ) * p_strides[2] + l * p_strides[3] + t * p_strides[4]]) : 0.0f;
    }
    float x[EL];
    dequantize_row<BITS, GS, LPK, WL>(
        v + v_base + t * v_strides[2], v_strides[3],
        v_scales + vs_base + t * v_scales_strides[2], v_scales_strides[3],
        v_biases + vb_base + t * v_biases_strides[2], v_biases_strides[3], live, lane, x);
    for (int r = 0; r < R; r++) {
      const float pr = simd_shuffle(mine[r / LPK], walker_lane0 + r % LPK);
      for (int j = 0; j < EL; j++) {
        o[r][j] += pr * x[j];
      }
    }
  }

  // Sum the walkers' rows, one row at a time.
  for (int r = 0; r < R; r++) {
    for (int j = 0; j < EL; j++) {
      walker_out[walker][(sub + LPK * (j / E)) * E + j % E] = o[r][j];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int l = l0 + r % LQ;
    const int q_row = (b * Hq + h * G + r / LQ) * L + l;
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

WRITE_OUTPUT = "out[int64_t(q_row) * D + d] = T(acc);"
WRITE_BLOCK = "partials[(int64_t(q_row) * threadgroups_per_grid.x + block) * D + d] = acc;"

# Second pass: one thread per (query row, d) adds up the key blocks.
SUM_BLOCKS = """
  const int n_blocks = partials_shape[3];
  const int d = thread_position_in_grid.x;
  const int row = thread_position_in_grid.y;
  if (d >= D) {
    return;
  }
  float acc = 0.0f;
  for (int j = 0; j < n_blocks; j++) {
    acc += partials[(int64_t(row) * n_blocks + j) * D + d];
  }
  out[int64_t(row) * D + d] = T(acc);
"""


@dataclass(frozen=True)
class Plan:
    group_size: int  # G
    queries_per_group: int  # LQ
    query_chunks: int
    keys_per_block: int
    blocks: int


def plan(p_shape, v_shape, *, keys_per_block=None, lane_values=None) -> Plan:
    """The layout of one call; `lane_values`: head-dim values one lane holds per
    query row (default ceil(D / 32), the float kernel's)."""
    B, Hkv, G, L, S = p_shape
    Bv, Hv, T, D = v_shape
    if (B, Hkv, S) != (Bv, Hv, T):
        raise ValueError(f"probabilities {tuple(p_shape)} do not fit values {tuple(v_shape)}: need the same batch, "
                         "kv heads and keys")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim {D} is outside 1..256")
    if G > MAX_ROWS:
        raise ValueError(f"{G} query heads per kv head: at most {MAX_ROWS}")
    lanes = lane_values or (D + 31) // 32
    LQ = max(1, min(L, MAX_ROWS // G, da.ROW_BUDGET * 2 // (G * lanes)))
    if G * lanes > da.ROW_BUDGET * 2:
        raise ValueError(f"{G} query heads per kv head at head dim {D} need too many registers")
    keys_per_block = max(1, da.default_keys_per_block(S) if keys_per_block is None else keys_per_block)
    return Plan(G, LQ, -(-L // LQ), keys_per_block, max(1, -(-S // keys_per_block)))


def build(factory=None, simd_groups: int = 8):
    """The P V callable, with kernels made by `factory` (mx.fast.metal_kernel by
    default; mslsim.metal_kernel on Linux tests)."""
    factory = factory or mx.fast.metal_kernel
    common = dict(input_names=["p", "v", "keys_per_block"], ensure_row_contiguous=False)
    single = factory(name="echo_apply_probabilities", output_names=["out"],
                     source=APPLY.replace("// <write row>", WRITE_OUTPUT), **common)
    blocks = factory(name="echo_apply_probabilities_blocks", output_names=["partials"],
                     source=APPLY.replace("// <write row>", WRITE_BLOCK), **common)
    add = factory(name="echo_apply_probabilities_sum", input_names=["partials"], output_names=["out"],
                  source=SUM_BLOCKS)

    quantized_common = dict(input_names=["p", "v", "v_scales", "v_biases", "keys_per_block"], header=qa.HEADER,
                            ensure_row_contiguous=False)
    quantized_single = factory(name="echo_quantized_apply_probabilities", output_names=["out"],
                               source=APPLY_QUANTIZED.replace("// <write row>", WRITE_OUTPUT), **quantized_common)
    quantized_blocks = factory(name="echo_quantized_apply_probabilities_blocks", output_names=["partials"],
                               source=APPLY_QUANTIZED.replace("// <write row>", WRITE_BLOCK), **quantized_common)

    def launch(kernels, inputs, template, layout, B, Hkv, G, L, D, dtype, simd_groups):
        single, blocks = kernels
        threads = 32 * simd_groups
        grid = (threads * layout.blocks, B * Hkv, layout.query_chunks)
        if layout.blocks == 1:
            return single(inputs=inputs, template=template, grid=grid, threadgroup=(threads, 1, 1),
                          output_shapes=[(B, Hkv * G, L, D)], output_dtypes=[dtype])[0]
        partials = blocks(inputs=inputs, template=template, grid=grid, threadgroup=(threads, 1, 1),
                          output_shapes=[(B, Hkv * G, L, layout.blocks, D)], output_dtypes=[mx.float32])[0]
        return add(inputs=[partials], template=[("T", dtype), ("D", D)], grid=(D, B * Hkv * G * L, 1),
                   threadgroup=(D, 1, 1), output_shapes=[(B, Hkv * G, L, D)], output_dtypes=[dtype])[0]

    def apply_probabilities(p, v, *, keys_per_block=None, bits=None, group_size=None, simd_groups: int = simd_groups):
        """P V for p (B, Hkv, G, L, S) and v (B, Hkv, S, D): (B, Hkv * G, L, D) in v's dtype.
        With `bits`, v is the `mx.quantize(x, group_size, bits)` tuple (packed, scales, biases)
        and the output has the scales' dtype. V may be a strided view (the valid part of a
        preallocated cache); its head dim innermost."""
        B, Hkv, G, L, S = p.shape
        if bits is None:
            D = v.shape[3]
            layout = plan(p.shape, v.shape, keys_per_block=keys_per_block)
            template = [("T", v.dtype), ("D", D), ("G", G), ("LQ", layout.queries_per_group), ("NSG", simd_groups)]
            return launch((single, blocks), [p, v, layout.keys_per_block], template, layout, B, Hkv, G, L, D,
                          v.dtype, simd_groups)
        packed, scales, biases = v
        D = packed.shape[3] * 32 // bits
        if tuple(scales.shape) != tuple(biases.shape) or tuple(scales.shape) != (*packed.shape[:3], D // group_size):
            raise ValueError(f"scales {tuple(scales.shape)} do not fit {bits}-bit rows of head dim {D} in groups of {group_size}")
        layout = plan(p.shape, (*packed.shape[:3], D), keys_per_block=keys_per_block,
                      lane_values=qa.values_per_lane(D, bits, group_size))
        template = [("T", scales.dtype), ("D", D), ("BITS", bits), ("GS", group_size), ("G", G),
                    ("LQ", layout.queries_per_group), ("NSG", simd_groups)]
        return launch((quantized_single, quantized_blocks), [p, packed, scales, biases, layout.keys_per_block],
                      template, layout, B, Hkv, G, L, D, scales.dtype, simd_groups)

    return apply_probabilities
