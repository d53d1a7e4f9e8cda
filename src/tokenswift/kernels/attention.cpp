// Attention kernels (one family of the native CPU kernels; common.h holds what they share).
//
// attention: grouped-query attention of T new tokens over a KV cache whose last T entries are
//   theirs. Every query row attends its *visible* keys (all cached ones, then the new ones its
//   mask allows, in index order). Those keys are split into chunks of `chunk` by their ordinal in
//   that visible sequence, each chunk's softmax partial is computed alone, and the partials are
//   merged in chunk order. A row of a T-token pass and the same token's one-token pass see the
//   same visible sequence (its ancestors committed in path order), hence the same bits.
//   Chunks that lie wholly in the cached prefix are shared by all G*T rows of a KV head, so each
//   K/V tile is read once for all of them. With `bf16` (bfloat16 K/V) it is bfloat16 attention:
//   queries and probabilities rounded to bfloat16, products summed in float32 in vdpbf16ps' order.
// attention_rows, sparse_select_dims: the sparse draft's attention over listed rows, and its
//   choice of them. quantize_q8: K/V rows to int8 for the draft's copy of the cache.

#include "common.h"
#include "amx.h"

namespace TS_NS {

// ---------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------

// Keys ahead of use that are prefetched: a one-query pass does little work per cache line, so
// the hardware prefetcher alone leaves it waiting on memory.
constexpr int PF = 32;
// Query rows of one chunk pass: 12 rows' scores over a 256-key chunk take 12 KiB (L1 is 32).
constexpr int64_t ROW_GROUP = 12;
template <typename E>
inline void prefetch_row(const E* p, int D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int i = 0; i < D * static_cast<int>(sizeof(E)); i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Scratch that keeps its memory between calls: large buffers allocated afresh on every call
// cost page faults and zeroing on each.
struct Scratch {
  std::unique_ptr<float[]> p;
  size_t n = 0;
  float* get(size_t want) {
    if (want > n) {
      p.reset(new float[want]);
      n = want;
    }
    return p.get();
  }
};

// o_r[d0*8 .. (d0+NB)*8) += sum_{j0 <= j < j1} p_r[j] v_j for RR rows at once (each V vector
// loaded once for them); every output element is one FMA chain in key order, whatever RR is.
template <int RR, int NB, typename E>
inline void pv_tile(const float* const* p, const E* const* vp, int j0, int j1, int d0, float* const* o) {
  __m256 acc[RR][NB];
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_loadu_ps(o[r] + (d0 + b) * 8);
  for (int j = j0; j < j1; ++j) {
    __m256 pj[RR];
    for (int r = 0; r < RR; ++r) pj[r] = _mm256_broadcast_ss(p[r] + j);
    const E* v = vp[j] + d0 * 8;
    for (int b = 0; b < NB; ++b) {
      __m256 vv = load8(v + b * 8);
      for (int r = 0; r < RR; ++r) acc[r][b] = _mm256_fmadd_ps(pj[r], vv, acc[r][b]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b) _mm256_storeu_ps(o[r] + (d0 + b) * 8, acc[r][b]);
}

template <int RR, typename E>
inline void pv_rows8(const float* const* p, const E* const* vp, int j0, int j1, int NV, float* const* o) {
  for (int d0 = 0; d0 < NV; d0 += 4) {
    switch (std::min(4, NV - d0)) {
      case 1: pv_tile<RR, 1, E>(p, vp, j0, j1, d0, o); break;
      case 2: pv_tile<RR, 2, E>(p, vp, j0, j1, d0, o); break;
      case 3: pv_tile<RR, 3, E>(p, vp, j0, j1, d0, o); break;
      default: pv_tile<RR, 4, E>(p, vp, j0, j1, d0, o); break;
    }
  }
}

#if defined(__AVX512F__)
// pv_tile sixteen elements a vector (d0 and NB in blocks of 16): each output element the same
// FMA chain in key order, so the same bits with half the instructions and widenings.
template <int RR, int NB, typename E>
inline void pv_tile16(const float* const* p, const E* const* vp, int j0, int j1, int d0, float* const* o) {
  __m512 acc[RR][NB];
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_loadu_ps(o[r] + (d0 + b) * 16);
  for (int j = j0; j < j1; ++j) {
    __m512 pj[RR];
    for (int r = 0; r < RR; ++r) pj[r] = _mm512_set1_ps(p[r][j]);
    const E* v = vp[j] + d0 * 16;
    for (int b = 0; b < NB; ++b) {
      const __m512 vv = load16(v + b * 16);
      for (int r = 0; r < RR; ++r) acc[r][b] = _mm512_fmadd_ps(pj[r], vv, acc[r][b]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(o[r] + (d0 + b) * 16, acc[r][b]);
}
#endif

// rows' o over D = 8 NV elements: 16 a vector where the build and D allow, else 8
template <int RR, typename E>
inline void pv_rows(const float* const* p, const E* const* vp, int j0, int j1, int NV, float* const* o) {
#if defined(__AVX512F__)
  if (NV % 2 == 0) {
    const int N16 = NV / 2;
    for (int d0 = 0; d0 < N16; d0 += 4) {
      switch (std::min(4, N16 - d0)) {
        case 1: pv_tile16<RR, 1, E>(p, vp, j0, j1, d0, o); break;
        case 2: pv_tile16<RR, 2, E>(p, vp, j0, j1, d0, o); break;
        case 3: pv_tile16<RR, 3, E>(p, vp, j0, j1, d0, o); break;
        default: pv_tile16<RR, 4, E>(p, vp, j0, j1, d0, o); break;
      }
    }
    return;
  }
#endif
  pv_rows8<RR, E>(p, vp, j0, j1, NV, o);
}

// One row against four keys: the same chains and the same tree as scores_2x4, half the work.
template <typename E>
inline void scores_1x4(const float* q0, const E* const* kj, int NV, float* s0) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int dv = 0; dv < NV; ++dv) {
    __m256 a = _mm256_loadu_ps(q0 + dv * 8);
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(a, load8(kj[j] + dv * 8), acc[j]);
  }
  _mm_storeu_ps(s0, _mm256_castps256_ps128(hsum8(acc)));
}

// Scores of two query rows against four keys: eight dot products, each lane-wise FMAs over the
// head dim then the hsum8 tree, so a score's bits do not depend on which row or key it is paired
// with. -> s0[0..4), s1[0..4)
template <typename E>
inline void scores_2x4(const float* q0, const float* q1, const E* const* kj, int NV, float* s0, float* s1) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int dv = 0; dv < NV; ++dv) {
    __m256 a = _mm256_loadu_ps(q0 + dv * 8), b = _mm256_loadu_ps(q1 + dv * 8);
    for (int j = 0; j < 4; ++j) {
      __m256 kv = load8(kj[j] + dv * 8);
      acc[j] = _mm256_fmadd_ps(a, kv, acc[j]);
      acc[4 + j] = _mm256_fmadd_ps(b, kv, acc[4 + j]);
    }
  }
  __m256 h = hsum8(acc);
  _mm_storeu_ps(s0, _mm256_castps256_ps128(h));
  _mm_storeu_ps(s1, _mm256_extractf128_ps(h, 1));
}

// Integer scores for int8 keys (D a multiple of 32): the query row quantized as the keys are,
// each score the exact int32 dot product of the two int8 rows. |k| times q-with-k's-sign through
// maddubs (pairs of 127 * 127 products fit int16), then madd into int32 lanes. Integer sums are
// exact, so a score's bits do not depend on its pairing either.
inline __m256i dot_i8(__m256i acc, __m256i q, __m256i k, __m256i ones) {
  __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(k, k), _mm256_sign_epi8(q, k));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ones));
}
inline __m256 hsum8i(const __m256i* a) {  // eight int32 vectors -> their eight sums, as float
  __m256i s01 = _mm256_hadd_epi32(a[0], a[1]), s23 = _mm256_hadd_epi32(a[2], a[3]);
  __m256i s45 = _mm256_hadd_epi32(a[4], a[5]), s67 = _mm256_hadd_epi32(a[6], a[7]);
  __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
  __m256i lo = _mm256_permute2x128_si256(s0123, s4567, 0x20), hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
  return _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
}
// up to three query rows against four int8 keys -> s[r][0..4) as float sums (unscaled)
template <int RR>
inline void scores_i8(const int8_t* const* q, const int8_t* const* kj, int D, float* const* s) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[3][4];
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int d = 0; d < D; d += 32) {
    __m256i k[4];
    for (int j = 0; j < 4; ++j) k[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kj[j] + d));
    for (int r = 0; r < RR; ++r) {
      __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + d));
      for (int j = 0; j < 4; ++j) acc[r][j] = dot_i8(acc[r][j], a, k[j], ones);
    }
  }
  __m256i h[8];
  for (int r = 0; r < RR; r += 2) {
    for (int j = 0; j < 4; ++j) {
      h[j] = acc[r][j];
      h[4 + j] = r + 1 < RR ? acc[r + 1][j] : _mm256_setzero_si256();
    }
    __m256 f = hsum8i(h);
    _mm_storeu_ps(s[r], _mm256_castps256_ps128(f));
    if (r + 1 < RR) _mm_storeu_ps(s[r + 1], _mm256_extractf128_ps(f, 1));
  }
}

#if defined(__AVX512VNNI__)
// The same integers with 16 keys in the 16 lanes (D % 64 == 0): the keys' 64-byte blocks
// transposed once into 16 vectors of their 4-byte groups, shared by every query row, then one
// vpdpbusd a row and group (the group's 4 query bytes broadcast): no horizontal sums, whose cost
// grew with the rows. The keys enter as unsigned (k + 128); the offset is taken back exactly with
// 128 times the row's byte sum. A row's 16 scores are exact integers, as scores_i8's.
struct KeysX16 {
  alignas(64) int32_t g[16][16];  // g[t][i]: key i's bytes 4t .. 4t+3 of the block, offset to unsigned
  // kj[0..16): key rows; bytes [d0, d0 + 64) of each
  void load(const int8_t* const* kj, int d0) {
    __m512i r[16], a[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(kj[i] + d0);
    for (int i = 0; i < 16; i += 2) {
      a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    // b[4i + c], 128-bit lane L: keys 4i .. 4i+3, group 4L + c
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int c = 0; c < 4; ++c) {
      const __m512i x = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), y = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
      const __m512i z = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                    w = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
      _mm512_store_si512(g[c], _mm512_xor_si512(_mm512_shuffle_i32x4(x, z, 0x88), flip));
      _mm512_store_si512(g[4 + c], _mm512_xor_si512(_mm512_shuffle_i32x4(x, z, 0xDD), flip));
      _mm512_store_si512(g[8 + c], _mm512_xor_si512(_mm512_shuffle_i32x4(y, w, 0x88), flip));
      _mm512_store_si512(g[12 + c], _mm512_xor_si512(_mm512_shuffle_i32x4(y, w, 0xDD), flip));
    }
  }
};

// 128 times the sum of a query row's D bytes (D % 64 == 0): what the keys' offset adds to a score
inline int32_t offset_i8(const int8_t* q, int D) {
  __m512i acc = _mm512_setzero_si512();
  for (int d = 0; d < D; d += 64)
    acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), _mm512_loadu_si512(q + d));
  return 128 * _mm512_reduce_add_epi32(acc);
}

// R query rows (R <= 12) against keys kj[0..16) -> s[r][0..n) (n <= 16) as float sums (unscaled);
// R a template argument, so that the accumulators stay in registers
template <int R>
inline void scores_i8_x16(const int8_t* const* q, const int32_t* off, const int8_t* const* kj, int D, int n,
                          float* const* s) {
  KeysX16 kt;
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int d0 = 0; d0 < D; d0 += 64) {
    kt.load(kj, d0);
    for (int t = 0; t < 16; ++t) {
      const __m512i k = _mm512_load_si512(kt.g[t]);
      for (int r = 0; r < R; ++r) {
        int32_t qg;
        std::memcpy(&qg, q[r] + d0 + 4 * t, 4);
        acc[r] = _mm512_dpbusd_epi32(acc[r], k, _mm512_set1_epi32(qg));
      }
    }
  }
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(s[r], m, _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], _mm512_set1_epi32(off[r]))));
}
#endif

// ---- bfloat16 attention (`bf16`: the model with "bf16 attention", bfloat16 K/V) --------------
// Each query row is rounded to bfloat16 once and each probability before it weights its value
// row; products are summed in float32 in the order AVX-512's vdpbf16ps sums them: lane i of an
// accumulator takes element pair (2i, 2i+1) of 32, the odd element's product first, each product
// (exact: two 8-bit mantissas) added with one rounding. On a CPU without that instruction the
// same order is two FMAs a pair, so both give the same bits. Values below 2^-126 in a query row or
// a probability are flushed to zero first, as the instruction treats them; K/V elements that
// small, or a partial sum that small (the instruction flushes it, an FMA keeps it), are where the
// two may differ: products of two normal numbers of a model's scale stay far above it.

// n floats -> bfloat16 bits, round to nearest even, |x| < 2^-126 to +0 (n % 8 == 0)
inline void to_bf16_ftz(const float* x, int n, uint16_t* out) {
  const __m256 tiny = _mm256_set1_ps(std::numeric_limits<float>::min());
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  for (int i = 0; i < n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    v = _mm256_and_ps(v, _mm256_cmp_ps(_mm256_andnot_ps(sign, v), tiny, _CMP_GE_OQ));
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
    u = _mm256_srli_epi32(u, 16);
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
}

#ifndef __AVX512BF16__
// 16 bfloat16 -> their odd elements' and even elements' float32 values (lane i: 2i+1, 2i)
inline void split_bf16(const void* p, __m256& odd, __m256& even) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#endif

// Scores of RR (1 or 2) bfloat16 query rows against four bfloat16 keys (D % 32 == 0): per pair
// of a row and a key, 16 lanes of pair sums over the head dim, lanes 0-7 plus lanes 8-15, then
// the hsum8 tree. -> s[r][0..4)
template <int RR>
inline void scores_bf(const uint16_t* const* q, const c10::BFloat16* const* kj, int D, float* const* s) {
  __m256 h[8];
#ifdef __AVX512BF16__
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 32) {
    __m512bh qv[RR];
    for (int r = 0; r < RR; ++r) qv[r] = (__m512bh)_mm512_loadu_si512(q[r] + d);
    for (int j = 0; j < 4; ++j) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kj[j] + d);
      for (int r = 0; r < RR; ++r) acc[r * 4 + j] = _mm512_dpbf16_ps(acc[r * 4 + j], qv[r], kv);
    }
  }
  for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]), _mm512_extractf32x8_ps(acc[i], 1));
#else
  __m256 acc[8][2];
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 32)
    for (int half = 0; half < 2; ++half) {
      __m256 qo[RR], qe[RR];
      for (int r = 0; r < RR; ++r) split_bf16(q[r] + d + 16 * half, qo[r], qe[r]);
      for (int j = 0; j < 4; ++j) {
        __m256 ko, ke;
        split_bf16(kj[j] + d + 16 * half, ko, ke);
        for (int r = 0; r < RR; ++r) {
          __m256& a = acc[r * 4 + j][half];
          a = _mm256_fmadd_ps(qe[r], ke, _mm256_fmadd_ps(qo[r], ko, a));
        }
      }
    }
  for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(acc[i][0], acc[i][1]);
#endif
  if (RR == 1)
    for (int i = 4; i < 8; ++i) h[i] = _mm256_setzero_ps();
  const __m256 t = hsum8(h);
  _mm_storeu_ps(s[0], _mm256_castps256_ps128(t));
  if (RR == 2) _mm_storeu_ps(s[1], _mm256_extractf128_ps(t, 1));
}

// o_r += sum over key pairs (j, j+1) in [j0, j1) of p_r[j+1] v_{j+1} + p_r[j] v_j for RR rows, the
// values' 32-element blocks d0 .. d0+NB: per output element one chain, key j+1's product then
// key j's, pair after pair (p as bfloat16 bits; an odd count nk of keys ends with a pair whose
// partner is key nk-1 again under the zero probability that pads p). With
// vdpbf16ps the accumulators hold each block's elements as unpacklo/unpackhi_epi16 of two rows
// leave them (per 128-bit lane: elements 0-3 in lo, 4-7 in hi); `pv_bf_unpermute` restores the
// order once a chunk is done. Without it, o is in element order throughout.
template <int RR, int NB>
inline void pv_bf_tile(const uint16_t* const* p, const c10::BFloat16* const* vp, int nk, int j0, int j1, int d0,
                       float* const* o) {
#ifdef __AVX512BF16__
  __m512 lo[RR][NB], hi[RR][NB];
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b) {
      lo[r][b] = _mm512_loadu_ps(o[r] + (d0 + b) * 32);
      hi[r][b] = _mm512_loadu_ps(o[r] + (d0 + b) * 32 + 16);
    }
  for (int j = j0; j < j1; j += 2) {
    __m512bh pj[RR];
    for (int r = 0; r < RR; ++r) {
      int32_t pair;
      std::memcpy(&pair, p[r] + j, 4);
      pj[r] = (__m512bh)_mm512_set1_epi32(pair);
    }
    const c10::BFloat16* w1 = vp[std::min(j + 1, nk - 1)];
    for (int b = 0; b < NB; ++b) {
      const __m512i v0 = _mm512_loadu_si512(vp[j] + (d0 + b) * 32), v1 = _mm512_loadu_si512(w1 + (d0 + b) * 32);
      const __m512bh L = (__m512bh)_mm512_unpacklo_epi16(v0, v1), Hh = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
      for (int r = 0; r < RR; ++r) {
        lo[r][b] = _mm512_dpbf16_ps(lo[r][b], pj[r], L);
        hi[r][b] = _mm512_dpbf16_ps(hi[r][b], pj[r], Hh);
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b) {
      _mm512_storeu_ps(o[r] + (d0 + b) * 32, lo[r][b]);
      _mm512_storeu_ps(o[r] + (d0 + b) * 32 + 16, hi[r][b]);
    }
#else
  __m256 acc[RR][NB][4];
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b)
      for (int e = 0; e < 4; ++e) acc[r][b][e] = _mm256_loadu_ps(o[r] + (d0 + b) * 32 + e * 8);
  for (int j = j0; j < j1; j += 2) {
    __m256 p0[RR], p1[RR];
    for (int r = 0; r < RR; ++r) {
      p0[r] = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(p[r][j]) << 16)));
      p1[r] = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(p[r][j + 1]) << 16)));
    }
    const c10::BFloat16* w1 = vp[std::min(j + 1, nk - 1)];
    for (int b = 0; b < NB; ++b)
      for (int e = 0; e < 4; ++e) {
        const __m256 x1 = load8(w1 + (d0 + b) * 32 + e * 8), x0 = load8(vp[j] + (d0 + b) * 32 + e * 8);
        for (int r = 0; r < RR; ++r)
          acc[r][b][e] = _mm256_fmadd_ps(p0[r], x0, _mm256_fmadd_ps(p1[r], x1, acc[r][b][e]));
      }
  }
  for (int r = 0; r < RR; ++r)
    for (int b = 0; b < NB; ++b)
      for (int e = 0; e < 4; ++e) _mm256_storeu_ps(o[r] + (d0 + b) * 32 + e * 8, acc[r][b][e]);
#endif
}

template <int RR>
inline void pv_bf_rows(const uint16_t* const* p, const c10::BFloat16* const* vp, int nk, int j0, int j1, int NB,
                       float* const* o) {
  for (int d0 = 0; d0 < NB; d0 += 2) {
    if (NB - d0 == 1)
      pv_bf_tile<RR, 1>(p, vp, nk, j0, j1, d0, o);
    else
      pv_bf_tile<RR, 2>(p, vp, nk, j0, j1, d0, o);
  }
}

// o[D] back to element order after vdpbf16ps' interleaved accumulation (a no-op without it)
inline void pv_bf_unpermute(float* o, int D) {
#ifdef __AVX512BF16__
  // lo lane 4l + k holds element 8l + k, hi lane 4l + k element 8l + 4 + k (l 128-bit lane, k < 4)
  alignas(64) static const int32_t first[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int32_t second[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i i0 = _mm512_load_si512(first), i1 = _mm512_load_si512(second);
  for (int d = 0; d < D; d += 32) {
    const __m512 L = _mm512_loadu_ps(o + d), Hh = _mm512_loadu_ps(o + d + 16);
    _mm512_storeu_ps(o + d, _mm512_permutex2var_ps(L, i0, Hh));
    _mm512_storeu_ps(o + d + 16, _mm512_permutex2var_ps(L, i1, Hh));
  }
#else
  (void)o;
  (void)D;
#endif
}

// A row's scores sr[0..nk) of one chunk (pad8 nkp) -> its partial's m (the max) and l (the sum of
// exp(s - m)) into ml[0], ml[1], with sr[j] = exp(s - m) left in place (zero past nk)
inline void chunk_softmax_row(float* sr, int nk, int nkp, float* ml) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int j = nk; j < nkp; ++j) sr[j] = ninf;
  __m256 mx = _mm256_set1_ps(ninf);  // max is exact in any order
  for (int j = 0; j < nkp; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float m = _mm_cvtss_f32(m4);
  ml[0] = m;
  ml[1] = hsum(exp_shift_sum8(sr, nkp, m));  // nkp % 8 == 0: every key
}

#if defined(__AVX512F__)
// ---- bfloat16 attention in AMX's order (`bf16_amx`: the model with "bf16-amx attention") -------
// The same roundings as bfloat16 attention above (query rows and probabilities to bfloat16, the
// sums l in float32), but every dot product summed as AMX-BF16's TDPBF16PS sums it (amx.h): in
// blocks of 32 elements (a score: 32 dims of the head; a weighted value: 32 keys of the chunk),
// within a block the even elements' products chained by FMAs from zero, the odd elements' in
// another chain, then acc = acc + (even + odd), acc from zero, blocks in order; every step with
// denormals read and written as zero. The `amx` build (and `amx_emu`) computes it on tiles: a
// chunk's keys are tile A and the query rows' pairs tile B (scores of 16 keys x R rows), then the
// rows' probabilities are tile A and pairs of value rows tile B (R rows x 16 value elements). The
// `avx512` build computes the same chains in vectors: 16 keys in the lanes (their 64-byte blocks
// transposed into pairs) for the scores, 16 value elements in the lanes for the sums. Each row's
// bits depend only on its own sequence of keys, so passes stay row-invariant.

// 16 rows of 16 int32 -> their transpose, in place (r[k] lane n = old r[n] lane k)
inline void transpose16_epi32(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3: u[4g + e] holds their element 4L + e in 128-bit lane L
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // 128-bit lane g of element 4L + e <- lane L of u[4g + e]
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44),
                  v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

inline __m512 bf16_even(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline __m512 bf16_odd(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// 16 bfloat16 -> float32
inline __m512 bf16_widen(const void* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Scores of RN query rows (float32 values of their bfloat16 bits) against 16 keys (kj; D = 32 NB)
// in AMX's order: per 32-dim block the keys' 64 bytes transposed into pairs, each row's even dims'
// FMA chain and odd dims' from zero, acc = acc + (even + odd) from zero, blocks in order -> s[r][0..16)
// where `live`.
template <int RN>
inline void scores_amx_order(const c10::BFloat16* const* kj, int NB, const float* const* qr, float* const* s,
                             __mmask16 live) {
  __m512 acc[RN];
  for (int r = 0; r < RN; ++r) acc[r] = _mm512_setzero_ps();
  for (int b = 0; b < NB; ++b) {
    __m512i t[16];
    for (int i = 0; i < 16; ++i) t[i] = _mm512_loadu_si512(kj[i] + 32 * b);
    transpose16_epi32(t);  // t[k]: pair k (dims 32b + 2k, +1) of the 16 keys
    __m512 even[RN], odd[RN];
    for (int r = 0; r < RN; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    for (int k = 0; k < 16; ++k) {
      const __m512 te = bf16_even(t[k]), to = bf16_odd(t[k]);
      for (int r = 0; r < RN; ++r) {
        even[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][32 * b + 2 * k]), te, even[r]);
        odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][32 * b + 2 * k + 1]), to, odd[r]);
      }
    }
    for (int r = 0; r < RN; ++r) acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(even[r], odd[r]));
  }
  for (int r = 0; r < RN; ++r) _mm512_mask_storeu_ps(s[r], live, acc[r]);
}

// RN rows' sums of 32 keys' value rows (vrow(j): bfloat16, zero past the chunk) weighted by their
// probabilities (pr[r][j], float32 values of bfloat16 bits) over 32 elements from d0, in AMX's
// order: per element the even keys' FMA chain and the odd keys' from zero, then o[r] += even + odd.
template <int RN, typename V>
inline void values_amx_order(const V& vrow, int j0, int d0, const float* const* pr, float* const* o) {
  __m512 even[RN][2], odd[RN][2];
  for (int r = 0; r < RN; ++r) even[r][0] = even[r][1] = odd[r][0] = odd[r][1] = _mm512_setzero_ps();
  for (int j = j0; j < j0 + 32; j += 2) {
    const __m512 ve0 = bf16_widen(vrow(j) + d0), ve1 = bf16_widen(vrow(j) + d0 + 16);
    const __m512 vo0 = bf16_widen(vrow(j + 1) + d0), vo1 = bf16_widen(vrow(j + 1) + d0 + 16);
    for (int r = 0; r < RN; ++r) {
      even[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][j]), ve0, even[r][0]);
      even[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][j]), ve1, even[r][1]);
      odd[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][j + 1]), vo0, odd[r][0]);
      odd[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][j + 1]), vo1, odd[r][1]);
    }
  }
  for (int r = 0; r < RN; ++r)
    for (int h = 0; h < 2; ++h) {
      float* dst = o[r] + d0 + 16 * h;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_add_ps(even[r][h], odd[r][h])));
    }
}

// A value row past a chunk's keys (zero), for the last 32-key block's pad
alignas(64) static const uint16_t kZeroRow[1024] = {};

// One chunk's partial (as chunk_partial's) for R <= 16 rows in AMX's order: qb the rows' bfloat16
// bits, kp/vp the nk key/value rows (bfloat16, D % 32 == 0, D <= 1024), s scratch of R * pad8(nk).
void chunk_partial_amx_order(int R, const uint16_t* const* qb, int nk, const c10::BFloat16* const* kp,
                             const c10::BFloat16* const* vp, int D, float* s, float* out) {
  TORCH_CHECK(R <= 16, "attention: bf16_amx takes at most 16 query rows a KV head, got ", R);
  const int nkp = (nk + 7) & ~7, n32 = (nk + 31) & ~31, P = D + 2, NB = D / 32;
  auto vrow = [&](int j) { return j < nk ? reinterpret_cast<const uint16_t*>(vp[j]) : kZeroRow; };
  static thread_local std::vector<uint16_t> pbuf;
  if (pbuf.size() < static_cast<size_t>(R) * n32) pbuf.resize(static_cast<size_t>(R) * n32);
  float* o_out = out + 2;
#if defined(TS_AMX_BF16)
  // tiles: 0-3 C of the sums (R rows x 16 elements), 4 A the probabilities (R rows x 32 keys),
  // 5 B the query pairs (16 pairs x R rows), 6 C the scores (16 keys x R rows), 7 A 16 keys' 32
  // dims or B 16 pairs of value rows (16 elements)
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(R), cfg.colsb[t] = 64;
  cfg.rows[4] = static_cast<uint8_t>(R), cfg.colsb[4] = 64;
  cfg.rows[5] = 16, cfg.colsb[5] = static_cast<uint16_t>(4 * R);
  cfg.rows[6] = 16, cfg.colsb[6] = static_cast<uint16_t>(4 * R);
  cfg.rows[7] = 16, cfg.colsb[7] = 64;
  tile_config(cfg);
  alignas(64) uint32_t qpair[32][16][16];  // [dims block][pair k][row]: B of the scores, 64-byte rows
  for (int b = 0; b < NB; ++b)
    for (int k = 0; k < 16; ++k)
      for (int r = 0; r < R; ++r) std::memcpy(&qpair[b][k][r], qb[r] + 32 * b + 2 * k, 4);
  alignas(64) uint16_t kbuf[16][32];
  alignas(64) float cs[16][16];
  for (int j0 = 0; j0 < nk; j0 += 16) {
    const int n = std::min(16, nk - j0);
    const int64_t ld = n > 1 ? (kp[j0 + 1] - kp[j0]) : D;
    bool strided = n == 16 && ld >= D;
    for (int i = 2; strided && i < 16; ++i) strided = kp[j0 + i] == kp[j0] + i * ld;
    for (int j = j0 + PF; j < std::min(j0 + PF + 16, nk); ++j) prefetch_row(kp[j], D);
    TS_TILE_ZERO(6);
    for (int b = 0; b < NB; ++b) {
      if (strided) {
        TS_TILE_LOAD(7, kp[j0] + 32 * b, ld * 2);
      } else {
        for (int i = 0; i < 16; ++i) {
          if (i < n) std::memcpy(kbuf[i], kp[j0 + i] + 32 * b, 64);
          else std::memset(kbuf[i], 0, 64);
        }
        TS_TILE_LOAD(7, kbuf, 64);
      }
      TS_TILE_LOAD(5, qpair[b], 64);
      TS_TILE_DPBF16PS(6, 7, 5);
    }
    TS_TILE_STORE(6, cs, 64);
    for (int i = 0; i < std::min(16, nkp - j0); ++i)
      for (int r = 0; r < R; ++r) s[r * nkp + j0 + i] = cs[i][r];
  }
#else
  {
    FlushDenormals ftz;
    // the rows' bfloat16 values as float32 (exact), read as broadcast operands of the FMAs
    static thread_local std::vector<float> qf;
    if (qf.size() < static_cast<size_t>(R) * D) qf.resize(static_cast<size_t>(R) * D);
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < D; ++d) {
        const uint32_t bits = uint32_t{qb[r][d]} << 16;
        std::memcpy(&qf[static_cast<size_t>(r) * D + d], &bits, 4);
      }
    for (int j0 = 0; j0 < nk; j0 += 16) {
      const int n = std::min(16, nk - j0);
      for (int j = j0 + PF; j < std::min(j0 + PF + 16, nk); ++j) prefetch_row(kp[j], D);
      const c10::BFloat16* kj[16];
      for (int i = 0; i < 16; ++i) kj[i] = kp[j0 + std::min(i, n - 1)];  // past nk the last key: discarded
      const __mmask16 live = static_cast<__mmask16>((1u << std::min(16, nkp - j0)) - 1);
      for (int r0 = 0; r0 < R; r0 += 6) {  // six rows' chains in registers beside the 16 pairs
        const float* qr[6];
        float* sr[6];
        const int rn = std::min(6, R - r0);
        for (int r = 0; r < rn; ++r) {
          qr[r] = qf.data() + static_cast<size_t>(r0 + r) * D;
          sr[r] = s + (r0 + r) * nkp + j0;
        }
        with_rows<6>(rn, [&](auto RN) { scores_amx_order<decltype(RN)::value>(kj, NB, qr, sr, live); });
      }
    }
  }
#endif
  for (int r = 0; r < R; ++r) {  // the softmax partial: as chunk_partial's
    float* sr = s + r * nkp;
    chunk_softmax_row(sr, nk, nkp, out + r * P);
    uint16_t* pr = pbuf.data() + static_cast<size_t>(r) * n32;
    to_bf16_ftz(sr, nkp, pr);
    std::fill(pr + nkp, pr + n32, uint16_t{0});
  }
  for (int j = 0; j < std::min(nk, PF); ++j) prefetch_row(vp[j], D);
#if defined(TS_AMX_BF16)
  alignas(64) uint32_t vpair[16][16];  // B: pair k = value rows 2k, 2k+1 of a 32-key block, 16 elements
  for (int d0 = 0; d0 < D; d0 += 64) {
    const int ng = std::min(4, (D - d0) / 16);
    TS_TILE_ZERO(0);
    TS_TILE_ZERO(1);
    TS_TILE_ZERO(2);
    TS_TILE_ZERO(3);
    for (int j0 = 0; j0 < n32; j0 += 32) {
      for (int j = j0 + PF; j < std::min(j0 + 32 + PF, nk); ++j) prefetch_row(vp[j], D);
      TS_TILE_LOAD(4, pbuf.data() + j0, static_cast<int64_t>(n32) * 2);
      for (int g = 0; g < ng; ++g) {
        for (int k = 0; k < 16; ++k) {
          const __m512i lo = _mm512_cvtepu16_epi32(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow(j0 + 2 * k) + d0 + 16 * g)));
          const __m512i hi = _mm512_cvtepu16_epi32(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow(j0 + 2 * k + 1) + d0 + 16 * g)));
          _mm512_store_si512(vpair[k], _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
        TS_TILE_LOAD(7, vpair, 64);
        switch (g) {
          case 0: TS_TILE_DPBF16PS(0, 4, 7); break;
          case 1: TS_TILE_DPBF16PS(1, 4, 7); break;
          case 2: TS_TILE_DPBF16PS(2, 4, 7); break;
          default: TS_TILE_DPBF16PS(3, 4, 7); break;
        }
      }
    }
    const int64_t os = static_cast<int64_t>(P) * 4;
    if (ng > 0) TS_TILE_STORE(0, o_out + d0, os);
    if (ng > 1) TS_TILE_STORE(1, o_out + d0 + 16, os);
    if (ng > 2) TS_TILE_STORE(2, o_out + d0 + 32, os);
    if (ng > 3) TS_TILE_STORE(3, o_out + d0 + 48, os);
  }
  tile_release();
#else
  FlushDenormals ftz;
  // the probabilities as float32 (exact), read as broadcast operands of the FMAs
  static thread_local std::vector<float> pf;
  if (pf.size() < static_cast<size_t>(R) * n32) pf.resize(static_cast<size_t>(R) * n32);
  for (size_t i = 0; i < static_cast<size_t>(R) * n32; ++i) {
    const uint32_t bits = uint32_t{pbuf[i]} << 16;
    std::memcpy(&pf[i], &bits, 4);
  }
  for (int r = 0; r < R; ++r) std::fill(o_out + r * P, o_out + r * P + D, 0.0f);
  for (int j0 = 0; j0 < n32; j0 += 32) {
    for (int j = j0 + PF; j < std::min(j0 + 32 + PF, nk); ++j) prefetch_row(vp[j], D);
    for (int d0 = 0; d0 < D; d0 += 32)
      for (int r0 = 0; r0 < R; r0 += 6) {  // six rows' chains in registers beside the value rows
        const float* pr[6];
        float* orow[6];
        const int rn = std::min(6, R - r0);
        for (int r = 0; r < rn; ++r) {
          pr[r] = pf.data() + static_cast<size_t>(r0 + r) * n32;
          orow[r] = o_out + (r0 + r) * P;
        }
        with_rows<6>(rn, [&](auto RN) { values_amx_order<decltype(RN)::value>(vrow, j0, d0, pr, orow); });
      }
  }
#endif
}
#endif

// One chunk's softmax partial for R query rows over nk keys (nk <= chunk): per row the chunk's
// max score m, sum of exp(s - m) l, and sum of exp(s - m) v (o[D]). Keys and values come as
// pointers to rows of D (float32, or int8 with per-row scales ksc/vsc: a score is the scale times
// the integer row's dot product, a value row enters with its probability times its scale). `s` is
// scratch of R * pad8(nk) floats. Row r's partial goes to out[r * (D + 2) ...] as m, l, o[D]: the
// layout the merge reads. With `q8` (int8 keys, D % 32 == 0) the scores are integer dot products
// of the rows' int8 copies q8[r] (scale qsc[r]) with the keys. With `qb` (bfloat16 K/V, D % 32
// == 0) the scores and the weighted values are bfloat16 attention's: the rows' bfloat16 copies
// qb[r] against the keys, and the probabilities rounded to bfloat16 (the sums l stay float32's).
template <typename E>
void chunk_partial(int R, const float* const* qp, int nk, const E* const* kp, const E* const* vp,
                   const float* ksc, const float* vsc, int D, float* s, float* out,
                   const int8_t* const* q8 = nullptr, const float* qsc = nullptr,
                   const uint16_t* const* qb = nullptr, bool amx_order = false) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<E, c10::BFloat16>) {
    if (qb && amx_order) return chunk_partial_amx_order(R, qb, nk, kp, vp, D, s, out);
  }
#endif
  const int NV = D / 8;
  const int nkp = (nk + 7) & ~7;
  bool scored = false;
#if defined(__AVX512VNNI__)
  if constexpr (std::is_same_v<E, int8_t>) {
    if (q8 && D % 64 == 0 && R <= 12) {  // 16 keys a block, all rows (the last block repeats its last key)
      int32_t off[12];
      float* sr[12];
      for (int r = 0; r < R; ++r) off[r] = offset_i8(q8[r], D);
      for (int j0 = 0; j0 < nkp; j0 += 16) {
        const E* kj[16];
        for (int j = 0; j < 16; ++j) kj[j] = kp[std::min(j0 + j, nk - 1)];
        for (int j = j0 + PF; j < std::min(j0 + PF + 16, nk); ++j) prefetch_row(kp[j], D);
        for (int r = 0; r < R; ++r) sr[r] = s + r * nkp + j0;
        const int n = std::min(16, nkp - j0);
        switch (R) {
          case 1: scores_i8_x16<1>(q8, off, kj, D, n, sr); break;
          case 2: scores_i8_x16<2>(q8, off, kj, D, n, sr); break;
          case 3: scores_i8_x16<3>(q8, off, kj, D, n, sr); break;
          case 4: scores_i8_x16<4>(q8, off, kj, D, n, sr); break;
          case 5: scores_i8_x16<5>(q8, off, kj, D, n, sr); break;
          case 6: scores_i8_x16<6>(q8, off, kj, D, n, sr); break;
          case 7: scores_i8_x16<7>(q8, off, kj, D, n, sr); break;
          case 8: scores_i8_x16<8>(q8, off, kj, D, n, sr); break;
          case 9: scores_i8_x16<9>(q8, off, kj, D, n, sr); break;
          case 10: scores_i8_x16<10>(q8, off, kj, D, n, sr); break;
          case 11: scores_i8_x16<11>(q8, off, kj, D, n, sr); break;
          default: scores_i8_x16<12>(q8, off, kj, D, n, sr); break;
        }
      }
      scored = true;
    }
  }
#endif
  // scores, four keys by two rows at a time (an odd last row alone; the last group repeats its
  // last key, and those slots are discarded)
  for (int j0 = 0; j0 < (scored ? 0 : nkp); j0 += 4) {
    const E* kj[4];
    for (int j = 0; j < 4; ++j) kj[j] = kp[std::min(j0 + j, nk - 1)];
    if ((j0 & 7) == 0)
      for (int j = j0 + PF; j < std::min(j0 + PF + 8, nk); ++j) prefetch_row(kp[j], D);
    if constexpr (std::is_same_v<E, int8_t>) {
      if (q8) {
        for (int r = 0; r < R; r += 3) {
          float* sr[3] = {s + r * nkp + j0, s + std::min(r + 1, R - 1) * nkp + j0, s + std::min(r + 2, R - 1) * nkp + j0};
          const int8_t* qr[3] = {q8[r], q8[std::min(r + 1, R - 1)], q8[std::min(r + 2, R - 1)]};
          switch (std::min(3, R - r)) {
            case 1: scores_i8<1>(qr, kj, D, sr); break;
            case 2: scores_i8<2>(qr, kj, D, sr); break;
            default: scores_i8<3>(qr, kj, D, sr); break;
          }
        }
        continue;
      }
    }
    if constexpr (std::is_same_v<E, c10::BFloat16>) {
      if (qb) {
        int r = 0;
        for (; r + 1 < R; r += 2) {
          float* sr[2] = {s + r * nkp + j0, s + (r + 1) * nkp + j0};
          scores_bf<2>(qb + r, kj, D, sr);
        }
        if (r < R) {
          float* sr[1] = {s + r * nkp + j0};
          scores_bf<1>(qb + r, kj, D, sr);
        }
        continue;
      }
    }
    int r = 0;
    for (; r + 1 < R; r += 2) scores_2x4(qp[r], qp[r + 1], kj, NV, s + r * nkp + j0, s + (r + 1) * nkp + j0);
    if (r < R) scores_1x4(qp[r], kj, NV, s + r * nkp + j0);
  }
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * nkp;
    if (q8)
      for (int j = 0; j < nk; ++j) sr[j] *= qsc[r];
    if (ksc)
      for (int j = 0; j < nk; ++j) sr[j] *= ksc[j];
    chunk_softmax_row(sr, nk, nkp, out + r * (D + 2));
    if (vsc)
      for (int j = 0; j < nk; ++j) sr[j] *= vsc[j];
  }
  // o = sum_j p_j v_j in key order; V tiles of 32 keys stay in L1 across the rows
  float* o_out = out + 2;  // row r's o at o_out + r * (D + 2)
  const int P = D + 2;
  for (int r = 0; r < R; ++r) std::fill(o_out + r * P, o_out + r * P + D, 0.0f);
  if constexpr (std::is_same_v<E, c10::BFloat16>) {
    if (qb) {  // the probabilities as bfloat16, zero past nk (the pad of an odd last pair)
      static thread_local std::vector<uint16_t> pbuf;
      if (pbuf.size() < static_cast<size_t>(R) * nkp) pbuf.resize(static_cast<size_t>(R) * nkp);
      for (int r = 0; r < R; ++r) to_bf16_ftz(s + r * nkp, nkp, pbuf.data() + r * nkp);
      const int npair = (nk + 1) & ~1;  // keys in pairs, an odd last one with its zero-weight partner
      for (int j = 0; j < std::min(nk, PF); ++j) prefetch_row(vp[j], D);
      for (int j0 = 0; j0 < nk; j0 += 32) {
        const int j1 = std::min(npair, j0 + 32);
        for (int j = j0 + PF; j < std::min(j0 + 32 + PF, nk); ++j) prefetch_row(vp[j], D);
        for (int r = 0; r < R; r += 3) {
          const int r1 = std::min(r + 1, R - 1), r2 = std::min(r + 2, R - 1);
          const uint16_t* pr[3] = {pbuf.data() + r * nkp, pbuf.data() + r1 * nkp, pbuf.data() + r2 * nkp};
          float* orow[3] = {o_out + r * P, o_out + r1 * P, o_out + r2 * P};
          switch (std::min(3, R - r)) {
            case 1: pv_bf_rows<1>(pr, vp, nk, j0, j1, D / 32, orow); break;
            case 2: pv_bf_rows<2>(pr, vp, nk, j0, j1, D / 32, orow); break;
            default: pv_bf_rows<3>(pr, vp, nk, j0, j1, D / 32, orow); break;
          }
        }
      }
      for (int r = 0; r < R; ++r) pv_bf_unpermute(o_out + r * P, D);
      return;
    }
  }
  for (int j = 0; j < std::min(nk, PF); ++j) prefetch_row(vp[j], D);
  for (int j0 = 0; j0 < nk; j0 += 32) {
    const int j1 = std::min(nk, j0 + 32);
    for (int j = j0 + PF; j < std::min(j1 + PF, nk); ++j) prefetch_row(vp[j], D);
    for (int r = 0; r < R; r += 3) {
      const float* pr[3] = {s + r * nkp, s + std::min(r + 1, R - 1) * nkp, s + std::min(r + 2, R - 1) * nkp};
      float* orow[3] = {o_out + r * P, o_out + std::min(r + 1, R - 1) * P, o_out + std::min(r + 2, R - 1) * P};
      switch (std::min(3, R - r)) {
        case 1: pv_rows<1, E>(pr, vp, j0, j1, NV, orow); break;
        case 2: pv_rows<2, E>(pr, vp, j0, j1, NV, orow); break;
        default: pv_rows<3, E>(pr, vp, j0, j1, NV, orow); break;
      }
    }
  }
}

// Key/value pointers of one chunk, rows in place (int8 with their scales gathered).
template <typename KT>
struct KVRows {
  std::vector<float> ks, vs;
  std::vector<const KT*> kp, vp;
  // ksb/vsb: the scales of this (b, kh), stride sstr per key (int8 only)
  void fill(const KT* kbase, const KT* vbase, int64_t kstride, int64_t vstride, const int64_t* idx, int n,
            const float* ksb = nullptr, const float* vsb = nullptr, int64_t kss = 0, int64_t vss = 0) {
    kp.resize(n);
    vp.resize(n);
    for (int j = 0; j < n; ++j) {
      kp[j] = kbase + idx[j] * kstride;
      vp[j] = vbase + idx[j] * vstride;
    }
    if constexpr (std::is_same_v<KT, int8_t>) {
      ks.resize(n);
      vs.resize(n);
      for (int j = 0; j < n; ++j) {
        ks[j] = ksb[idx[j] * kss];
        vs[j] = vsb[idx[j] * vss];
      }
    }
  }
  // rows scattered over the cache (a sparse list): their lines asked for before they are read, so
  // that the misses overlap (`bytes` a row)
  void prefetch(int64_t bytes) const {
    for (size_t j = 0; j < kp.size(); ++j)
      for (int64_t o = 0; o < bytes; o += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kp[j]) + o, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vp[j]) + o, _MM_HINT_T0);
      }
  }
  const float* kscale() const { return ks.empty() ? nullptr : ks.data(); }
  const float* vscale() const { return vs.empty() ? nullptr : vs.data(); }
};

// One row's output: the merge of its nc chunk partials (m, l, o[D] each, `part(c)`) in chunk order,
// into dst[D]; returns the row's log-sum-exp.
template <typename F>
inline float merge_partials(int64_t nc, const F& part, int64_t D, float* dst) {
  float M = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < nc; ++c) M = std::max(M, part(c)[0]);
  float L = 0.0f;
  std::fill(dst, dst + D, 0.0f);
  for (int64_t c = 0; c < nc; ++c) {
    const float* pc = part(c);
    const float w = std::exp(pc[0] - M);
    L += pc[1] * w;
    __m256 wv = _mm256_set1_ps(w);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(pc + 2 + d), _mm256_loadu_ps(dst + d)));
  }
  __m256 Lv = _mm256_set1_ps(L);
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, _mm256_div_ps(_mm256_loadu_ps(dst + d), Lv));
  return M + std::log(L);
}

// Partial layout: per (row, chunk) D + 2 floats: m, l, o[D].
template <typename KT>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                    int64_t chunk, at::Tensor& out, at::Tensor* lse, const at::Tensor* kscale = nullptr,
                    const at::Tensor* vscale = nullptr, const int64_t* kv_start = nullptr, bool bf = false,
                    bool bfa = false) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t KH = k.size(1), S = k.size(2), G = H / KH;
  const int64_t n = S - T;  // cached keys, visible to every row (from its kv_start on, when given)
  // chunks that lie wholly in the cached prefix, shared by the rows; with per-row starts (a
  // sliding window) each row's visible sequence is its own and is chunked from its start
  const int64_t nfull = kv_start ? 0 : n / chunk;
  int64_t first = nfull * chunk;  // the earliest cached key a row reads outside the shared chunks
  if (kv_start)
    for (int64_t i = 0; i < B * T; ++i) first = std::min(first, kv_start[i]);
  const int64_t GT = G * T, P = D + 2;
  const float* qd = q.data_ptr<float>();
  const KT* kd = k.data_ptr<KT>();
  const KT* vd = v.data_ptr<KT>();
  const bool* md = mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t mB = mask ? mask->size(0) : 0;
  float* od = out.data_ptr<float>();
  float* ld = lse ? lse->data_ptr<float>() : nullptr;
  const int64_t qsb = q.stride(0), qst = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), kss = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vss = v.stride(2);
  // int8 K/V: scales [B, KH, S]
  const float* ksd = kscale ? kscale->data_ptr<float>() : nullptr;
  const float* vsd = vscale ? vscale->data_ptr<float>() : nullptr;
  const int64_t kcb = kscale ? kscale->stride(0) : 0, kch = kscale ? kscale->stride(1) : 0,
                kcs = kscale ? kscale->stride(2) : 0;
  const int64_t vcb = vscale ? vscale->stride(0) : 0, vch = vscale ? vscale->stride(1) : 0,
                vcs = vscale ? vscale->stride(2) : 0;
  auto kbase_s = [&](int64_t b, int64_t kh) { return ksd ? ksd + b * kcb + kh * kch : nullptr; };
  auto vbase_s = [&](int64_t b, int64_t kh) { return vsd ? vsd + b * vcb + kh * vch : nullptr; };

  // prefix partials [B, KH, nfull, GT, P]; rows ordered (t, g)
  static thread_local Scratch pre_buf;
  float* pre = pre_buf.get(static_cast<size_t>(B * KH * nfull * GT * P) + 1);
  auto qrow = [&](int64_t b, int64_t t, int64_t h) { return qd + b * qsb + t * qst + h * qsh; };
  // int8 keys: the query rows in int8 too (integer scores), row (b, t, h) at ((b * T + t) * H + h)
  const bool iq = std::is_same_v<KT, int8_t> && D % 32 == 0;
  std::vector<int8_t> q8buf(iq ? B * T * H * D : 0);
  std::vector<float> q8s(iq ? B * T * H : 0);
  if (iq)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t r = (b * T + t) * H + h;
          q8s[r] = quantize_row(qrow(b, t, h), D, q8buf.data() + r * D);
        }
  auto q8row = [&](int64_t b, int64_t t, int64_t h) { return q8buf.data() + ((b * T + t) * H + h) * D; };
  auto q8scale = [&](int64_t b, int64_t t, int64_t h) { return q8s[(b * T + t) * H + h]; };
  // bfloat16 attention: the query rows rounded to bfloat16, row (b, t, h) at ((b * T + t) * H + h)
  std::vector<uint16_t> qbbuf(bf ? B * T * H * D : 0);
  if (bf)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h)
          to_bf16_ftz(qrow(b, t, h), static_cast<int>(D), qbbuf.data() + ((b * T + t) * H + h) * D);
  auto qbrow = [&](int64_t b, int64_t t, int64_t h) {
    return static_cast<const uint16_t*>(qbbuf.data() + ((b * T + t) * H + h) * D);
  };

  at::parallel_for(0, B * KH * nfull, 1, [&](int64_t begin, int64_t end) {
    KVRows<KT> kv;
    std::vector<int64_t> idx(chunk);
    std::vector<const float*> qp(GT);
    std::vector<const int8_t*> q8p(GT);
    std::vector<const uint16_t*> qbp(GT);
    std::vector<float> qs(GT);
    static thread_local Scratch s_buf;
    float* s = s_buf.get(static_cast<size_t>(GT) * ((chunk + 7) & ~7));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t c = it % nfull, kh = (it / nfull) % KH, b = it / (nfull * KH);
      for (int64_t j = 0; j < chunk; ++j) idx[j] = c * chunk + j;
      kv.fill(kd + b * ksb + kh * ksh, vd + b * vsb + kh * vsh, kss, vss, idx.data(), chunk, kbase_s(b, kh),
              vbase_s(b, kh), kcs, vcs);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          qp[t * G + g] = qrow(b, t, kh * G + g);
          if (bf) qbp[t * G + g] = qbrow(b, t, kh * G + g);
          if (iq) {
            q8p[t * G + g] = q8row(b, t, kh * G + g);
            qs[t * G + g] = q8scale(b, t, kh * G + g);
          }
        }
      // rows in groups whose scores stay in L1; the chunk's K/V are re-read from L2 per group
      float* dst = pre + static_cast<size_t>(it) * GT * P;
      for (int64_t r0 = 0; r0 < GT; r0 += ROW_GROUP) {
        const int rn = static_cast<int>(std::min<int64_t>(ROW_GROUP, GT - r0));
        chunk_partial(rn, qp.data() + r0, chunk, kv.kp.data(), kv.vp.data(), kv.kscale(), kv.vscale(), D, s,
                      dst + r0 * P, iq ? q8p.data() + r0 : nullptr, iq ? qs.data() + r0 : nullptr,
                      bf ? qbp.data() + r0 : nullptr, bfa);
      }
    }
  });

  // per (b, kh, t): the tail chunks of the G rows of token t, then the merge of all chunks
  const int64_t tail_max = (n - first) + T;
  const int64_t tchunks_max = (tail_max + chunk - 1) / chunk;
  at::parallel_for(0, B * KH * T, 1, [&](int64_t begin, int64_t end) {
    KVRows<KT> kv;
    std::vector<int64_t> idx(tail_max);
    std::vector<const float*> qp(G);
    std::vector<const int8_t*> q8p(G);
    std::vector<const uint16_t*> qbp(G);
    std::vector<float> qs(G);
    static thread_local Scratch s_buf, t_buf;
    float* s = s_buf.get(static_cast<size_t>(G) * ((chunk + 7) & ~7));
    float* tail = t_buf.get(static_cast<size_t>(tchunks_max) * G * P);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t = it % T, kh = (it / T) % KH, b = it / (T * KH);
      int64_t cnt = 0;
      for (int64_t j = kv_start ? kv_start[b * T + t] : nfull * chunk; j < n; ++j) idx[cnt++] = j;
      const bool* mrow = md ? md + ((mB == 1 ? 0 : b) * T + t) * T : nullptr;
      for (int64_t i = 0; i < T; ++i)
        if (mrow ? mrow[i] : i <= t) idx[cnt++] = n + i;
      for (int64_t g = 0; g < G; ++g) {
        qp[g] = qrow(b, t, kh * G + g);
        if (bf) qbp[g] = qbrow(b, t, kh * G + g);
        if (iq) {
          q8p[g] = q8row(b, t, kh * G + g);
          qs[g] = q8scale(b, t, kh * G + g);
        }
      }
      const int64_t tch = (cnt + chunk - 1) / chunk;
      for (int64_t c = 0; c < tch; ++c) {
        const int64_t c0 = c * chunk, nk = std::min(chunk, cnt - c0);
        kv.fill(kd + b * ksb + kh * ksh, vd + b * vsb + kh * vsh, kss, vss, idx.data() + c0, nk, kbase_s(b, kh),
                vbase_s(b, kh), kcs, vcs);
        chunk_partial(G, qp.data(), nk, kv.kp.data(), kv.vp.data(), kv.kscale(), kv.vscale(), D, s,
                      tail + c * G * P, iq ? q8p.data() : nullptr, iq ? qs.data() : nullptr, bf ? qbp.data() : nullptr,
                      bfa);
      }
      // merge in chunk order: prefix chunks 0..nfull-1, then the tail's
      const float* pbase = pre + static_cast<size_t>((b * KH + kh) * nfull) * GT * P;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g;
        auto part = [&](int64_t c) -> const float* {
          return c < nfull ? pbase + (c * GT + r) * P : tail + ((c - nfull) * G + g) * P;
        };
        const float l = merge_partials(nfull + tch, part, D, od + (b * T + t) * H * D + (kh * G + g) * D);
        if (ld) ld[(b * T + t) * H + kh * G + g] = l;
      }
    }
  });
}

// One token's attention (q [1, 1, H, D], scaled) in which each KV head reads its own list of key
// rows (rows [KH, R]: entry indices into k/v [1, KH, S, D]) in place: chunks of `chunk` rows by
// ordinal in the list, merged in order. The arithmetic of `attention` over the listed rows, so a
// gathered copy of them gives the same bits. The sparse draft's attention (`SparseKV`).
template <typename KT>
void attention_rows_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                         int64_t chunk, at::Tensor& out) {
  const int64_t H = q.size(2), D = q.size(3), KH = k.size(1), G = H / KH, R = rows.size(1), P = D + 2;
  const int64_t nc = (R + chunk - 1) / chunk;
  const float* qd = q.data_ptr<float>();
  const KT* kd = k.data_ptr<KT>();
  const KT* vd = v.data_ptr<KT>();
  const int64_t* rd = rows.data_ptr<int64_t>();
  const int64_t qsh = q.stride(2), ksh = k.stride(1), kss = k.stride(2), vsh = v.stride(1), vss = v.stride(2);
  std::vector<float> parts(static_cast<size_t>(KH * nc * G * P));  // [KH, nc, G, P]
  at::parallel_for(0, KH * nc, 1, [&](int64_t begin, int64_t end) {
    KVRows<KT> kv;
    std::vector<const float*> qp(G);
    static thread_local Scratch s_buf;
    float* s = s_buf.get(static_cast<size_t>(G) * ((chunk + 7) & ~7));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t c = it % nc, kh = it / nc, c0 = c * chunk;
      const int nk = static_cast<int>(std::min(chunk, R - c0));
      kv.fill(kd + kh * ksh, vd + kh * vsh, kss, vss, rd + kh * R + c0, nk);
      if (it == begin) kv.prefetch(D * static_cast<int64_t>(sizeof(KT)));
      if (it + 1 < end) {  // the next chunk's rows are asked for while this one is worked
        const int64_t n1 = (it + 1) / nc, r1 = ((it + 1) % nc) * chunk, e1 = std::min(R, r1 + chunk);
        for (int64_t i = r1; i < e1; ++i) {
          const int64_t row = rd[n1 * R + i];
          for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(KT)); o += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kd + n1 * ksh + row * kss) + o, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(vd + n1 * vsh + row * vss) + o, _MM_HINT_T0);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) qp[g] = qd + (kh * G + g) * qsh;
      chunk_partial(static_cast<int>(G), qp.data(), nk, kv.kp.data(), kv.vp.data(), nullptr, nullptr,
                    static_cast<int>(D), s, parts.data() + it * G * P);
    }
  });
  float* od = out.data_ptr<float>();
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t g = 0; g < G; ++g)
      merge_partials(nc, [&](int64_t c) -> const float* { return parts.data() + ((kh * nc + c) * G + g) * P; }, D,
                     od + (kh * G + g) * D);
}

at::Tensor attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                          int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(1) == 1, "attention_rows: q must be [1, 1, H, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention_rows: q must be float32");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == 1 && v.sizes() == k.sizes(), "attention_rows: k/v [1,KH,S,D]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attention_rows: k and v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_rows: last dim must be contiguous");
  const int64_t H = q.size(2), D = q.size(3), KH = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(3) == D && D % 8 == 0 && H % KH == 0, "attention_rows: shapes disagree");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(0) == KH && rows.size(1) >= 1 &&
                  rows.is_contiguous(),
              "attention_rows: rows must be contiguous int64 [KH, R >= 1]");
  TORCH_CHECK(chunk >= 8 && chunk % 8 == 0, "attention_rows: chunk must be a positive multiple of 8");
  {  // a plain scan: two torch reductions cost more than this kernel's work at 4K rows
    const int64_t* rd = rows.data_ptr<int64_t>();
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < rows.numel(); ++i) {
      lo = std::min(lo, rd[i]);
      hi = std::max(hi, rd[i]);
    }
    TORCH_CHECK(lo >= 0 && hi < S, "attention_rows: a row lies outside k");
  }
  at::Tensor out = at::empty({1, 1, H * D}, q.options());
  switch (k.scalar_type()) {
    case at::kFloat: attention_rows_impl<float>(q, k, v, rows, chunk, out); break;
    case at::kBFloat16: attention_rows_impl<c10::BFloat16>(q, k, v, rows, chunk, out); break;
    case at::kHalf: attention_rows_impl<c10::Half>(q, k, v, rows, chunk, out); break;
    default: TORCH_CHECK(false, "attention_rows: K/V must be float32, bfloat16 or float16");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const c10::optional<at::Tensor>& mask, int64_t chunk, bool want_lse,
                                             const c10::optional<at::Tensor>& k_scale,
                                             const c10::optional<at::Tensor>& v_scale,
                                             const c10::optional<at::Tensor>& kv_start, bool bf16,
                                             bool bf16_amx) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q [B,T,H,D], k/v [B,KH,S,D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention: q must be float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attention: k and v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: last dim must be contiguous");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(2) == k.size(2),
              "attention: shapes disagree");
  TORCH_CHECK(H % k.size(1) == 0, "attention: query heads not a multiple of KV heads");
  TORCH_CHECK(D % 8 == 0, "attention: head_dim must be a multiple of 8");
  TORCH_CHECK(k.size(2) >= T && T >= 1, "attention: fewer keys than new tokens");
  TORCH_CHECK(chunk >= 8 && chunk % 8 == 0, "attention: chunk must be a positive multiple of 8");
  TORCH_CHECK(!bf16 || (k.scalar_type() == at::kBFloat16 && D % 32 == 0),
              "attention: bfloat16 attention needs bfloat16 K/V and head_dim a multiple of 32, got ",
              k.scalar_type(), " and head_dim ", D);
#if defined(__AVX512F__)
  TORCH_CHECK(!bf16_amx || (bf16 && D <= 1024), "attention: bf16_amx is bfloat16 attention's order (bf16=True), ",
              "head_dim at most 1024, got head_dim ", D);
#else
  TORCH_CHECK(!bf16_amx, "attention: bfloat16 attention in AMX's order runs on the avx512 and amx levels only");
#endif
  const at::Tensor* mp = nullptr;
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(1) == T && m.size(2) == T &&
                    (m.size(0) == 1 || m.size(0) == B),
                "attention: mask must be bool [1 or B, T, T]");
    mp = &m;
  }
  at::Tensor out = at::empty({B, T, H * D}, q.options());
  at::Tensor lse = want_lse ? at::empty({B, T, H}, q.options()) : at::Tensor();
  at::Tensor* lp = want_lse ? &lse : nullptr;
  const bool q8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(q8 == (k_scale.has_value() && v_scale.has_value()) && k_scale.has_value() == v_scale.has_value(),
              "attention: int8 K/V need k_scale and v_scale, other dtypes take none");
  if (q8) {
    for (const at::Tensor* t : {&*k_scale, &*v_scale})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == k.size(1) &&
                      t->size(2) == k.size(2),
                  "attention: scales must be float32 [B, KH, S]");
  }
  at::Tensor ksc;
  const int64_t* ksp = nullptr;
  if (kv_start.has_value()) {  // per row: the first cached key it sees (a sliding window's start)
    ksc = kv_start->contiguous();
    TORCH_CHECK(ksc.scalar_type() == at::kLong && ksc.dim() == 2 && ksc.size(0) == B && ksc.size(1) == T,
                "attention: kv_start must be int64 [B, T]");
    ksp = ksc.data_ptr<int64_t>();
    for (int64_t i = 0; i < B * T; ++i)
      TORCH_CHECK(ksp[i] >= 0 && ksp[i] <= k.size(2) - T, "attention: kv_start ", ksp[i], " outside [0, ",
                  k.size(2) - T, "]");
  }
  switch (k.scalar_type()) {
    case at::kFloat: attention_impl<float>(q, k, v, mp, chunk, out, lp, nullptr, nullptr, ksp); break;
    case at::kBFloat16:
      attention_impl<c10::BFloat16>(q, k, v, mp, chunk, out, lp, nullptr, nullptr, ksp, bf16, bf16_amx);
      break;
    case at::kHalf: attention_impl<c10::Half>(q, k, v, mp, chunk, out, lp, nullptr, nullptr, ksp); break;
    case at::kChar: attention_impl<int8_t>(q, k, v, mp, chunk, out, lp, &*k_scale, &*v_scale, ksp); break;
    default: TORCH_CHECK(false, "attention: K/V must be float32, bfloat16, float16 or int8");
  }
  return {out, lse};
}

// 32 entries [j, j+32) of one KV head against GG query rows' 7-bit codes (four to an int32 of
// qpat, row g's at qpat[g * nq]) over `dims` dims of the dimension-major copy (rows base + dm[i] *
// ld): integer dot products with the keys offset to unsigned bytes for maddubs, four dims at a
// time (their bytes interleaved in registers once for all rows), out[g][32] in entry order.
template <int GG>
inline void dims_block32(const int8_t* base, int64_t ld, const int64_t* dm, int64_t nq, const int32_t* qpat,
                         int64_t j, int32_t (*out)[32]) {
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[GG][4];
  for (int g = 0; g < GG; ++g)
    for (int r = 0; r < 4; ++r) acc[g][r] = _mm256_setzero_si256();
  for (int64_t t = 0; t < nq; ++t) {
    const __m256i A = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + dm[4 * t] * ld + j));
    const __m256i B = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + dm[4 * t + 1] * ld + j));
    const __m256i C = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + dm[4 * t + 2] * ld + j));
    const __m256i E = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + dm[4 * t + 3] * ld + j));
    // per 128-bit lane: its entries 0-7 (lo) / 8-15 (hi), the four dims' bytes side by side
    const __m256i ab0 = _mm256_unpacklo_epi8(A, B), ab1 = _mm256_unpackhi_epi8(A, B);
    const __m256i ce0 = _mm256_unpacklo_epi8(C, E), ce1 = _mm256_unpackhi_epi8(C, E);
    const __m256i z[4] = {_mm256_xor_si256(_mm256_unpacklo_epi16(ab0, ce0), flip),
                          _mm256_xor_si256(_mm256_unpackhi_epi16(ab0, ce0), flip),
                          _mm256_xor_si256(_mm256_unpacklo_epi16(ab1, ce1), flip),
                          _mm256_xor_si256(_mm256_unpackhi_epi16(ab1, ce1), flip)};  // k + 128, unsigned
    for (int g = 0; g < GG; ++g) {
      const __m256i qv = _mm256_set1_epi32(qpat[g * nq + t]);
      for (int r = 0; r < 4; ++r)
        acc[g][r] = _mm256_add_epi32(acc[g][r], _mm256_madd_epi16(_mm256_maddubs_epi16(z[r], qv), ones));
    }
  }
  // z[r] held entries 4r..4r+3 in its low lane and 16+4r.. in its high lane: back to entry order
  for (int g = 0; g < GG; ++g) {
    const __m256i* c = acc[g];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[g]), _mm256_permute2x128_si256(c[0], c[1], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[g] + 8), _mm256_permute2x128_si256(c[2], c[3], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[g] + 16), _mm256_permute2x128_si256(c[0], c[1], 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[g] + 24), _mm256_permute2x128_si256(c[2], c[3], 0x31));
  }
}

#if defined(__AVX512VNNI__)
// The same integers for 64 entries [j, j+64) by VNNI (the AVX-512 build): the four dims' bytes
// interleaved as in `dims_block32`, now per 128-bit lane of 16 entries, so that each 32-bit lane
// holds one entry's four (unsigned) key bytes and vpdpbusd adds its four products with the row's
// codes: one instruction for 16 entries and four dims, where maddubs, madd and add took three for
// 8. Integer sums: the same as `dims_block32`'s, whatever the order. out[g][64] in entry order.
template <int GG>
inline void dims_block64_vnni(const int8_t* base, int64_t ld, const int64_t* dm, int64_t nq, const int32_t* qpat,
                              int64_t j, int32_t (*out)[64]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[GG][4];
  for (int g = 0; g < GG; ++g)
    for (int r = 0; r < 4; ++r) acc[g][r] = _mm512_setzero_si512();
  for (int64_t t = 0; t < nq; ++t) {
    const __m512i A = _mm512_loadu_si512(base + dm[4 * t] * ld + j);
    const __m512i B = _mm512_loadu_si512(base + dm[4 * t + 1] * ld + j);
    const __m512i C = _mm512_loadu_si512(base + dm[4 * t + 2] * ld + j);
    const __m512i E = _mm512_loadu_si512(base + dm[4 * t + 3] * ld + j);
    const __m512i ab0 = _mm512_unpacklo_epi8(A, B), ab1 = _mm512_unpackhi_epi8(A, B);
    const __m512i ce0 = _mm512_unpacklo_epi8(C, E), ce1 = _mm512_unpackhi_epi8(C, E);
    // z[r], 128-bit lane L: entries 16L + 4r .. 16L + 4r + 3, a dword each
    const __m512i z[4] = {_mm512_xor_si512(_mm512_unpacklo_epi16(ab0, ce0), flip),
                          _mm512_xor_si512(_mm512_unpackhi_epi16(ab0, ce0), flip),
                          _mm512_xor_si512(_mm512_unpacklo_epi16(ab1, ce1), flip),
                          _mm512_xor_si512(_mm512_unpackhi_epi16(ab1, ce1), flip)};
    for (int g = 0; g < GG; ++g) {
      const __m512i qv = _mm512_set1_epi32(qpat[g * nq + t]);
      for (int r = 0; r < 4; ++r) acc[g][r] = _mm512_dpbusd_epi32(acc[g][r], z[r], qv);
    }
  }
  // lane L of z[0..3] holds entries 16L .. 16L+15: a 4x4 transpose of 128-bit lanes
  for (int g = 0; g < GG; ++g) {
    const __m512i* c = acc[g];
    const __m512i t0 = _mm512_shuffle_i32x4(c[0], c[1], 0x44), t1 = _mm512_shuffle_i32x4(c[2], c[3], 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(c[0], c[1], 0xEE), t3 = _mm512_shuffle_i32x4(c[2], c[3], 0xEE);
    _mm512_storeu_si512(out[g], _mm512_shuffle_i32x4(t0, t1, 0x88));
    _mm512_storeu_si512(out[g] + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
    _mm512_storeu_si512(out[g] + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
    _mm512_storeu_si512(out[g] + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
  }
}
#endif

// The level's block of entries scored a call: 64 by VNNI on AVX-512, 32 by maddubs elsewhere.
#if defined(__AVX512VNNI__)
constexpr int64_t DIMS_BLK = 64;
template <int GG>
inline void dims_block(const int8_t* base, int64_t ld, const int64_t* dm, int64_t nq, const int32_t* qpat, int64_t j,
                       int32_t (*out)[DIMS_BLK]) {
  dims_block64_vnni<GG>(base, ld, dm, nq, qpat, j, out);
}
#else
constexpr int64_t DIMS_BLK = 32;
template <int GG>
inline void dims_block(const int8_t* base, int64_t ld, const int64_t* dm, int64_t nq, const int32_t* qpat, int64_t j,
                       int32_t (*out)[DIMS_BLK]) {
  dims_block32<GG>(base, ld, dm, nq, qpat, j, out);
}
#endif

// The sparse draft's rows for one query (q [1, 1, H, D], scaled) in one layer, scored against an
// int8 copy of the keys kept dimension-major (kt [KH, D, >= S]: row d holds dim d of every entry;
// ks [KH, >= S] the entries' row scales), as SparQ scores keys by the query's largest dimensions.
// Per KV head: the `dims` dims where the group's sum of |q| is largest; each query row's values
// there rounded to 7 bits (scale max|q|/64); every entry of [a, b) scored by integer dot products
// (`dims_block32`, or `dims_block64_vnni` on AVX-512: the same integers), times its row scale and
// the query's; each row's softmax over those entries, summed over the group, weighs an entry
// (16 lanes at a time on AVX-512, each lane's operations and every sum's order as on AVX2's 8, so
// both levels choose the same rows). Rows out: [0, a) (sinks), the top `budget` of [a, b) by
// weight (ties: the earlier entry), then [b, S) (the recent window), ascending: [KH, a + budget +
// S - b] int64. The top `budget` come from a floor estimated on every 16th weight, then an exact
// choice (`nth_element`) among the entries above it: no sort of them all.
at::Tensor sparse_select_dims(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& ks, int64_t a, int64_t b,
                              int64_t S, int64_t budget, int64_t dims) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(1) == 1 && q.scalar_type() == at::kFloat && q.stride(3) == 1,
              "sparse_select_dims: q must be float32 [1, 1, H, D]");
  TORCH_CHECK(kt.dim() == 3 && kt.scalar_type() == at::kChar && kt.stride(2) == 1,
              "sparse_select_dims: kt must be int8 [KH, D, S], last dim contiguous");
  TORCH_CHECK(ks.dim() == 2 && ks.scalar_type() == at::kFloat && ks.size(0) == kt.size(0) && ks.stride(1) == 1 &&
                  ks.size(1) >= kt.size(2),
              "sparse_select_dims: ks must be float32 [KH, S], last dim contiguous");
  const int64_t H = q.size(2), D = q.size(3), KH = kt.size(0), G = H / KH, M = b - a;
  TORCH_CHECK(kt.size(1) == D && H % KH == 0 && G <= 8 && dims % 4 == 0 && 4 <= dims && dims <= D,
              "sparse_select_dims: shapes disagree (at most 8 query rows a KV head; dims a multiple of 4 in [4, D])");
  TORCH_CHECK(0 <= a && a < b && b <= S && S <= kt.size(2) && 1 <= budget && budget <= M && M < (int64_t(1) << 32),
              "sparse_select_dims: need 0 <= a < b <= S <= entries, 1 <= budget <= b - a < 2^32");
  const float* qd = q.data_ptr<float>();
  const int8_t* kd = kt.data_ptr<int8_t>();
  const float* sd = ks.data_ptr<float>();
  const int64_t qh_s = q.stride(2), kt_h = kt.stride(0), kt_d = kt.stride(1), ks_h = ks.stride(0);
  const int64_t nq = dims / 4;
  // per KV head: its dims; per query row: 7-bit codes (four to an int32 pattern), scale, and the
  // offset the unsigned keys add (128 times the codes' sum)
  std::vector<int64_t> dim(KH * dims);
  std::vector<int32_t> qpat(KH * G * nq);
  std::vector<int8_t> q7(KH * G * dims);
  std::vector<float> qsc(KH * G);
  std::vector<int32_t> corr(KH * G);
  for (int64_t kh = 0; kh < KH; ++kh) {
    std::vector<double> mass(D, 0.0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) mass[d] += std::fabs(double(qd[(kh * G + g) * qh_s + d]));
    std::vector<int64_t> order(D);
    for (int64_t d = 0; d < D; ++d) order[d] = d;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return mass[x] > mass[y]; });
    std::sort(order.begin(), order.begin() + dims);
    std::copy(order.begin(), order.begin() + dims, dim.begin() + kh * dims);
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = qd + (kh * G + g) * qh_s;
      float amax = 0.0f;
      for (int64_t i = 0; i < dims; ++i) amax = std::max(amax, std::fabs(qr[dim[kh * dims + i]]));
      const float sc = amax / 64.0f;
      int8_t* code = q7.data() + (kh * G + g) * dims;
      int32_t sum = 0;
      for (int64_t i = 0; i < dims; ++i) {
        code[i] = sc > 0.0f ? static_cast<int8_t>(std::nearbyint(qr[dim[kh * dims + i]] / sc)) : 0;
        sum += code[i];
      }
      for (int64_t t = 0; t < nq; ++t) std::memcpy(&qpat[(kh * G + g) * nq + t], code + 4 * t, 4);
      qsc[kh * G + g] = sc;
      corr[kh * G + g] = 128 * sum;
    }
  }
  // Two passes over the entries, each span of them (its rows' scores: 24 KB) worked while in the
  // cache. Pass one: the span's scores, then in place their exps from the span's own max, each
  // row's span max and sum, and every 16th exp of each row into a sample. Between: each row's
  // max and softmax sum from the spans', so a span's exps times a factor per (span, row) are the
  // softmax; the sample's weights give a floor below the budget-th weight. Pass two: each entry's
  // weight (the group's summed softmax) and the entries at or above the floor, in entry order.
  // Only the exps cross the passes (G x M floats: before, the scores crossed four passes).
  constexpr int64_t SPAN = 2048, STRIDE = 16, SEL_PF = 1024;
  const int64_t spans = (M + SPAN - 1) / SPAN, ns = (M + STRIDE - 1) / STRIDE;
  static thread_local Scratch sc_buf;
  float* sc = sc_buf.get(static_cast<size_t>(KH * G * (M + ns)));  // exps [KH, G, M], sample [KH, G, ns]
  float* smp = sc + KH * G * M;
  std::vector<float> pmax(static_cast<size_t>(KH * spans * G)), psum(static_cast<size_t>(KH * spans * G));
  at::parallel_for(0, KH * spans, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t BLK = DIMS_BLK;
    alignas(64) int32_t dot[8][BLK];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t kh = it / spans, j0 = (it % spans) * SPAN, j1 = std::min(M, j0 + SPAN);
      const int8_t* base = kd + kh * kt_h + a;
      const int64_t* dm = dim.data() + kh * dims;
      const int32_t* qp = qpat.data() + kh * G * nq;
      const float* srow = sd + kh * ks_h + a;
      __m256 mx[8];
      for (int64_t g = 0; g < G; ++g) mx[g] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      int64_t j = j0;
      // the copy's rows are `dims` streams read a block at a time: more than the hardware
      // prefetchers follow (in a model the layer's copy comes from memory, and the choice ran at
      // a fifth of its bandwidth), so each line is asked for SEL_PF entries ahead, past the span's
      // end too (a thread's next span is mostly the next one), and a span's first SEL_PF entries
      // as it starts
      if (j0 == 0 || it == begin)
        for (int64_t o = 0; o < std::min(SEL_PF, j1 - j0); o += 64)
          for (int64_t i = 0; i < dims; ++i) _mm_prefetch(reinterpret_cast<const char*>(base + dm[i] * kt_d + j0 + o), _MM_HINT_T0);
      for (; j + BLK <= j1; j += BLK) {
        if ((BLK == 64 || ((a + j) & 63) == 0) && j + SEL_PF < M)
          for (int64_t i = 0; i < dims; ++i) _mm_prefetch(reinterpret_cast<const char*>(base + dm[i] * kt_d + j + SEL_PF), _MM_HINT_T0);
        for (int64_t g0 = 0; g0 < G; g0 += 4) {  // up to four rows a call: their accumulators stay in registers
          switch (std::min<int64_t>(4, G - g0)) {
            case 1: dims_block<1>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
            case 2: dims_block<2>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
            case 3: dims_block<3>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
            default: dims_block<4>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const __m256i off = _mm256_set1_epi32(corr[kh * G + g]);
          const __m256 qs = _mm256_set1_ps(qsc[kh * G + g]);
          for (int r = 0; r < BLK / 8; ++r) {
            const __m256i d = _mm256_load_si256(reinterpret_cast<const __m256i*>(dot[g] + 8 * r));
            const __m256 s = _mm256_mul_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d, off)), _mm256_loadu_ps(srow + j + 8 * r)), qs);
            _mm256_storeu_ps(sc + (kh * G + g) * M + j + 8 * r, s);
            mx[g] = _mm256_max_ps(mx[g], s);
          }
        }
      }
      float tail[8];
      for (int64_t g = 0; g < G; ++g) tail[g] = -std::numeric_limits<float>::infinity();
      for (; j < j1; ++j)  // the last entries, one at a time: the same integers
        for (int64_t g = 0; g < G; ++g) {
          int32_t d = 0;
          const int8_t* code = q7.data() + (kh * G + g) * dims;
          for (int64_t i = 0; i < dims; ++i) d += code[i] * base[dm[i] * kt_d + j];
          const float s = (static_cast<float>(d) * srow[j]) * qsc[kh * G + g];
          sc[(kh * G + g) * M + j] = s;
          tail[g] = std::max(tail[g], s);
        }
      for (int64_t g = 0; g < G; ++g) {
        alignas(32) float l[8];
        _mm256_store_ps(l, mx[g]);
        float m = tail[g];
        for (float x : l) m = std::max(m, x);
        float* sr = sc + (kh * G + g) * M;
        float sum = hsum(exp_shift_sum8(sr + j0, j1 - j0, m));
        for (int64_t i = j0 + (j1 - j0) / 8 * 8; i < j1; ++i) {  // the last entries, one at a time
          sr[i] = std::exp(sr[i] - m);
          sum += sr[i];
        }
        pmax[it * G + g] = m;
        psum[it * G + g] = sum;
        float* sm = smp + (kh * G + g) * ns;
        for (int64_t k = (j0 + STRIDE - 1) / STRIDE * STRIDE; k < j1; k += STRIDE) sm[k / STRIDE] = sr[k];
      }
    }
  });
  // factor[kh, span, g]: exp(span max - row max) / the row's softmax sum
  std::vector<float> factor(static_cast<size_t>(KH * spans * G));
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t g = 0; g < G; ++g) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t sp = 0; sp < spans; ++sp) m = std::max(m, pmax[(kh * spans + sp) * G + g]);
      float l = 0.0f;
      for (int64_t sp = 0; sp < spans; ++sp) {
        const int64_t x = (kh * spans + sp) * G + g;
        factor[x] = std::exp(pmax[x] - m);
        l += psum[x] * factor[x];
      }
      for (int64_t sp = 0; sp < spans; ++sp) factor[(kh * spans + sp) * G + g] /= l;
    }
  // per KV head, a floor below its budget-th weight, from the sample: the weight a quarter more
  // than its share of the sample (plus 8) beats. Every entry at or above it is a candidate; were
  // there fewer than `budget`, all entries are
  std::vector<float> floor_(KH);
  at::parallel_for(0, KH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sw(static_cast<size_t>(ns));
    for (int64_t kh = begin; kh < end; ++kh) {
      for (int64_t k = 0; k < ns; ++k) {
        const float* f = factor.data() + (kh * spans + k * STRIDE / SPAN) * G;
        float x = 0.0f;
        for (int64_t g = 0; g < G; ++g) x += smp[(kh * G + g) * ns + k] * f[g];
        sw[k] = x;
      }
      const int64_t k = std::min(ns - 1, budget * ns / M + budget * ns / M / 4 + 8);
      std::nth_element(sw.begin(), sw.begin() + k, sw.end(), std::greater<float>());
      floor_[kh] = sw[k];
    }
  });
  // weights of every entry (pass two); a candidate goes out as one integer key, its weight's bits
  // (a weight is >= 0, so its bits order as it does) over the complement of its entry: keys order
  // as (weight desc, entry asc) and the choice below compares integers
  auto key = [](float w, int64_t j) {
    uint32_t bits;
    std::memcpy(&bits, &w, 4);
    return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(j));
  };
  std::vector<std::vector<uint64_t>> cands(KH * spans);
  auto weigh = [&](int64_t kh, int64_t sp, int64_t j0, int64_t j1, float fl, std::vector<uint64_t>& c) {
    const float* e = sc + kh * G * M;
    const float* f = factor.data() + (kh * spans + sp) * G;
    const __m256 l = _mm256_set1_ps(fl);
    alignas(64) float x8[16];
    int64_t j = j0;
#if defined(__AVX512F__)
    for (const __m512 l16 = _mm512_set1_ps(fl); j + 16 <= j1; j += 16) {  // each lane as below
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(e + j), _mm512_set1_ps(f[0]));
      for (int64_t g = 1; g < G; ++g)
        x = _mm512_add_ps(x, _mm512_mul_ps(_mm512_loadu_ps(e + g * M + j), _mm512_set1_ps(f[g])));
      uint32_t m = _mm512_cmp_ps_mask(x, l16, _CMP_GE_OQ);
      if (m) {
        _mm512_store_ps(x8, x);
        for (; m; m &= m - 1) {
          const int r = __builtin_ctz(m);
          c.push_back(key(x8[r], j + r));
        }
      }
    }
#endif
    for (; j + 8 <= j1; j += 8) {
      __m256 x = _mm256_mul_ps(_mm256_loadu_ps(e + j), _mm256_set1_ps(f[0]));
      for (int64_t g = 1; g < G; ++g)
        x = _mm256_add_ps(x, _mm256_mul_ps(_mm256_loadu_ps(e + g * M + j), _mm256_set1_ps(f[g])));
      int m = _mm256_movemask_ps(_mm256_cmp_ps(x, l, _CMP_GE_OQ));
      if (m) {
        _mm256_store_ps(x8, x);
        for (; m; m &= m - 1) {
          const int r = __builtin_ctz(m);
          c.push_back(key(x8[r], j + r));
        }
      }
    }
    for (; j < j1; ++j) {
      float x = e[j] * f[0];
      for (int64_t g = 1; g < G; ++g) x += e[g * M + j] * f[g];
      if (x >= fl) c.push_back(key(x, j));
    }
  };
  at::parallel_for(0, KH * spans, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t kh = it / spans, sp = it % spans, j0 = sp * SPAN, j1 = std::min(M, j0 + SPAN);
      cands[it].clear();
      weigh(kh, sp, j0, j1, floor_[kh], cands[it]);
    }
  });
  // per KV head: the candidates in entry order, the budget-th largest key among them, and out go
  // those at or above it, still in entry order
  const int64_t R = a + budget + (S - b);
  at::Tensor out = at::empty({KH, R}, at::TensorOptions().dtype(at::kLong));
  int64_t* od = out.data_ptr<int64_t>();
  at::parallel_for(0, KH, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> all, nth;
    for (int64_t kh = begin; kh < end; ++kh) {
      all.clear();
      for (int64_t sp = 0; sp < spans; ++sp)
        all.insert(all.end(), cands[kh * spans + sp].begin(), cands[kh * spans + sp].end());
      if (static_cast<int64_t>(all.size()) < budget) {  // the sample's floor was too high: every entry
        all.clear();
        for (int64_t sp = 0; sp < spans; ++sp)
          weigh(kh, sp, sp * SPAN, std::min(M, (sp + 1) * SPAN), -std::numeric_limits<float>::infinity(), all);
      }
      nth = all;
      std::nth_element(nth.begin(), nth.begin() + (budget - 1), nth.end(), std::greater<uint64_t>());
      const uint64_t cut = nth[budget - 1];
      int64_t* dst = od + kh * R;
      for (int64_t i = 0; i < a; ++i) *dst++ = i;
      for (const uint64_t k : all)
        if (k >= cut) *dst++ = a + (0xFFFFFFFFu - static_cast<uint32_t>(k));
      for (int64_t i = b; i < S; ++i) *dst++ = i;
    }
  });
  return out;
}

// x [B, KH, T, D] float32 -> q int8 and scale [B, KH, T], written in place (views of a cache):
// per row scale = max|x| / 127, q = round-to-even(x / scale), 0 for an all-zero row. The same
// arithmetic as `kernels.quantize_q8_reference`, so both give the same bits. A bfloat16 or
// float16 x (a cache layer itself) is widened a row at a time, exactly, into float32 first: the
// bits of quantizing x.float(), without that copy of the whole block.
template <typename E>
void quantize_q8_impl(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  const int64_t KH = x.size(1), T = x.size(2), D = x.size(3);
  const E* xd = x.data_ptr<E>();
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = scale.data_ptr<float>();
  at::parallel_for(0, x.size(0) * KH * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(std::is_same_v<E, float> ? 0 : D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t = it % T, h = (it / T) % KH, b = it / (T * KH);
      const E* xr = xd + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      const float* xf;
      if constexpr (std::is_same_v<E, float>) {
        xf = xr;
      } else {
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(row.data() + d, load8(xr + d));
        xf = row.data();
      }
      sd[b * scale.stride(0) + h * scale.stride(1) + t * scale.stride(2)] =
          quantize_row(xf, D, qd + b * q.stride(0) + h * q.stride(1) + t * q.stride(2));
    }
  });
}

void quantize_q8(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 4 && q.scalar_type() == at::kChar && q.sizes() == x.sizes(),
              "quantize_q8: x [B, KH, T, D], q int8 of the same shape");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 3 && scale.sizes() == x.sizes().slice(0, 3),
              "quantize_q8: scale float32 [B, KH, T]");
  TORCH_CHECK(x.stride(3) == 1 && q.stride(3) == 1, "quantize_q8: last dim must be contiguous");
  TORCH_CHECK(x.size(3) % 8 == 0, "quantize_q8: head_dim must be a multiple of 8");
  switch (x.scalar_type()) {
    case at::kFloat: quantize_q8_impl<float>(x, q, scale); break;
    case at::kBFloat16: quantize_q8_impl<c10::BFloat16>(x, q, scale); break;
    case at::kHalf: quantize_q8_impl<c10::Half>(x, q, scale); break;
    default: TORCH_CHECK(false, "quantize_q8: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

// One TDPBF16PS on given tiles: c float32 [M, N] + a bfloat16 [M, 2K] times b bfloat16 [K, 2N] (b's
// row k: N pairs), M, N, K <= 16 -> the new c. The instruction on the `amx` level, its model on
// `amx_emu`: what tests/test_amx_bf16.py holds against the SDM's order.
at::Tensor run_tile_dpbf16ps(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
#if defined(TS_AMX_BF16)
  TORCH_CHECK(c.scalar_type() == at::kFloat && a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
                  c.dim() == 2 && a.dim() == 2 && b.dim() == 2,
              "tile_dpbf16ps: c float32 [M, N], a bfloat16 [M, 2K], b bfloat16 [K, 2N]");
  const int64_t M = c.size(0), N = c.size(1), K = b.size(0);
  TORCH_CHECK(M >= 1 && M <= 16 && N >= 1 && N <= 16 && K >= 1 && K <= 16 && a.size(0) == M && a.size(1) == 2 * K &&
                  b.size(1) == 2 * N,
              "tile_dpbf16ps: shapes must be c [M, N], a [M, 2K], b [K, 2N] with M, N, K in 1..16");
  at::Tensor out = c.contiguous().clone();
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  TileConfig cfg;
  cfg.rows[0] = static_cast<uint8_t>(M), cfg.colsb[0] = static_cast<uint16_t>(4 * N);
  cfg.rows[1] = static_cast<uint8_t>(M), cfg.colsb[1] = static_cast<uint16_t>(4 * K);
  cfg.rows[2] = static_cast<uint8_t>(K), cfg.colsb[2] = static_cast<uint16_t>(4 * N);
  tile_config(cfg);
  TS_TILE_LOAD(0, out.data_ptr<float>(), 4 * N);
  TS_TILE_LOAD(1, ac.data_ptr<at::BFloat16>(), 4 * K);
  TS_TILE_LOAD(2, bc.data_ptr<at::BFloat16>(), 4 * N);
  TS_TILE_DPBF16PS(0, 1, 2);
  TS_TILE_STORE(0, out.data_ptr<float>(), 4 * N);
  tile_release();
  return out;
#else
  (void)c, (void)a, (void)b;
  TORCH_CHECK(false, "tile_dpbf16ps: this build has no AMX-BF16 tiles (the amx and amx_emu levels have)");
#endif
}

}  // namespace TS_NS

TORCH_LIBRARY_FRAGMENT(TS_NS, m) {
  m.def("tile_dpbf16ps(Tensor c, Tensor a, Tensor b) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, int chunk, bool want_lse, Tensor? k_scale=None, "
        "Tensor? v_scale=None, Tensor? kv_start=None, bool bf16=False, bool bf16_amx=False) -> (Tensor, Tensor)");
  m.def("attention_rows(Tensor q, Tensor k, Tensor v, Tensor rows, int chunk) -> Tensor");
  m.def("sparse_select_dims(Tensor q, Tensor kt, Tensor ks, int a, int b, int S, int budget, int dims) -> Tensor");
  m.def("quantize_q8(Tensor x, Tensor(a!) q, Tensor(b!) scale) -> ()");
}

TORCH_LIBRARY_IMPL(TS_NS, CPU, m) {
  m.impl("attention", &TS_NS::attention);
  m.impl("tile_dpbf16ps", &TS_NS::run_tile_dpbf16ps);
  m.impl("attention_rows", &TS_NS::attention_rows);
  m.impl("sparse_select_dims", &TS_NS::sparse_select_dims);
  m.impl("quantize_q8", &TS_NS::quantize_q8);
}
