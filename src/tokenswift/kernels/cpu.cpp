// Native CPU kernels (AVX2 + FMA, threads through at::parallel_for).
//
// Both kernels are row-invariant: a row's result is computed by the same instructions in the
// same order whatever the number of rows in the call, so a T-token pass equals T one-token
// passes bit for bit. That is what makes speculative decoding give plain decoding's tokens.
//
// attention: grouped-query attention of T new tokens over a KV cache whose last T entries are
//   theirs. Every query row attends its *visible* keys (all cached ones, then the new ones its
//   mask allows, in index order). Those keys are split into chunks of `chunk` by their ordinal in
//   that visible sequence, each chunk's softmax partial is computed alone, and the partials are
//   merged in chunk order. A row of a T-token pass and the same token's one-token pass see the
//   same visible sequence (its ancestors committed in path order), hence the same bits.
//   Chunks that lie wholly in the cached prefix are shared by all G*T rows of a KV head, so each
//   K/V tile is read once for all of them.
//
// linear: y = x W^T + b against weights packed into panels of 48 outputs ([N/48][K][48]); every
//   output is one FMA chain over k = 0..K-1, whatever the tile of rows it is computed in.
//
// qlinear: the same product against GGUF Q4_0/Q4_1/Q8_0 blocks kept at their size, each code
//   dequantized in registers to exactly the float32 weight the file's reference dequantization
//   gives, so that it equals `linear` on the dequantized matrix bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

// the op namespace: one per instruction level (kernels/__init__.py builds each with -DTS_NS=...)
#ifndef TS_NS
#define TS_NS tokenswift
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// vector helpers
// ---------------------------------------------------------------------------------------------

// exp(x) for float32 lanes: range reduction by ln 2 in two parts, a degree-6 polynomial, and 2^n
// built in the exponent bits. About 1 ulp; x below -87.3 gives exactly 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 hi = _mm256_set1_ps(88.3f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Eight vectors -> one vector of their eight horizontal sums, each by the same tree
// ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7)), so a sum's bits do not depend on its slot.
inline __m256 hsum8(const __m256* a) {
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
  __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
  __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23);
  __m256 s4567 = _mm256_hadd_ps(s45, s67);
  __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

inline float hsum(__m256 v) {
  __m256 a[8] = {v, v, v, v, v, v, v, v};
  return _mm_cvtss_f32(_mm256_castps256_ps128(hsum8(a)));
}

// Eight K/V elements as float32 lanes, widened in registers from the cache's own type, so no
// converted copy is ever written: float32 rows are read as they are, float16 through F16C,
// bfloat16 by a 16-bit shift (both exact), int8 rows (the draft's quantized cache) as integers
// whose per-row scales are applied to the scores and the probabilities instead.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One row of D floats (D % 8 == 0) -> int8 codes; returns its scale max|x| / 127 (codes
// round-to-even(x / scale), all 0 for an all-zero row).
inline float quantize_row(const float* x, int64_t D, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + d)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = 0.0f;
  for (float l : lanes) m = std::max(m, l);
  const float s = m / 127.0f;
  if (s == 0.0f) {
    std::fill(q, q + D, int8_t{0});
    return s;
  }
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t d = 0; d < D; d += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    __m256i i32 = _mm256_cvtps_epi32(r);
    __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + d), _mm_packs_epi16(i16, i16));
  }
  return s;
}

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
inline void pv_rows(const float* const* p, const E* const* vp, int j0, int j1, int NV, float* const* o) {
  for (int d0 = 0; d0 < NV; d0 += 4) {
    switch (std::min(4, NV - d0)) {
      case 1: pv_tile<RR, 1, E>(p, vp, j0, j1, d0, o); break;
      case 2: pv_tile<RR, 2, E>(p, vp, j0, j1, d0, o); break;
      case 3: pv_tile<RR, 3, E>(p, vp, j0, j1, d0, o); break;
      default: pv_tile<RR, 4, E>(p, vp, j0, j1, d0, o); break;
    }
  }
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

// One chunk's softmax partial for R query rows over nk keys (nk <= chunk): per row the chunk's
// max score m, sum of exp(s - m) l, and sum of exp(s - m) v (o[D]). Keys and values come as
// pointers to rows of D (float32, or int8 with per-row scales ksc/vsc: a score is the scale times
// the integer row's dot product, a value row enters with its probability times its scale). `s` is
// scratch of R * pad8(nk) floats. Row r's partial goes to out[r * (D + 2) ...] as m, l, o[D]: the
// layout the merge reads. With `q8` (int8 keys, D % 32 == 0) the scores are integer dot products
// of the rows' int8 copies q8[r] (scale qsc[r]) with the keys.
template <typename E>
void chunk_partial(int R, const float* const* qp, int nk, const E* const* kp, const E* const* vp,
                   const float* ksc, const float* vsc, int D, float* s, float* out,
                   const int8_t* const* q8 = nullptr, const float* qsc = nullptr) {
  const int NV = D / 8;
  const int nkp = (nk + 7) & ~7;
  // scores, four keys by two rows at a time (an odd last row alone; the last group repeats its
  // last key, and those slots are discarded)
  for (int j0 = 0; j0 < nkp; j0 += 4) {
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
    int r = 0;
    for (; r + 1 < R; r += 2) scores_2x4(qp[r], qp[r + 1], kj, NV, s + r * nkp + j0, s + (r + 1) * nkp + j0);
    if (r < R) scores_1x4(qp[r], kj, NV, s + r * nkp + j0);
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * nkp;
    if (q8)
      for (int j = 0; j < nk; ++j) sr[j] *= qsc[r];
    if (ksc)
      for (int j = 0; j < nk; ++j) sr[j] *= ksc[j];
    for (int j = nk; j < nkp; ++j) sr[j] = ninf;
    __m256 mx = _mm256_set1_ps(ninf);  // max is exact in any order
    for (int j = 0; j < nkp; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + j));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float m = _mm_cvtss_f32(m4);
    __m256 mv = _mm256_set1_ps(m), lv = _mm256_setzero_ps();
    for (int j = 0; j < nkp; j += 8) {
      __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
      _mm256_storeu_ps(sr + j, p);
      lv = _mm256_add_ps(lv, p);
    }
    out[r * (D + 2)] = m;
    out[r * (D + 2) + 1] = hsum(lv);
    if (vsc)
      for (int j = 0; j < nk; ++j) sr[j] *= vsc[j];
  }
  // o = sum_j p_j v_j in key order; V tiles of 32 keys stay in L1 across the rows
  float* o_out = out + 2;  // row r's o at o_out + r * (D + 2)
  const int P = D + 2;
  for (int r = 0; r < R; ++r) std::fill(o_out + r * P, o_out + r * P + D, 0.0f);
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
                    const at::Tensor* vscale = nullptr, const int64_t* kv_start = nullptr) {
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

  at::parallel_for(0, B * KH * nfull, 1, [&](int64_t begin, int64_t end) {
    KVRows<KT> kv;
    std::vector<int64_t> idx(chunk);
    std::vector<const float*> qp(GT);
    std::vector<const int8_t*> q8p(GT);
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
                      dst + r0 * P, iq ? q8p.data() + r0 : nullptr, iq ? qs.data() + r0 : nullptr);
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
                      tail + c * G * P, iq ? q8p.data() : nullptr, iq ? qs.data() : nullptr);
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
                                             const c10::optional<at::Tensor>& kv_start) {
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
    case at::kBFloat16: attention_impl<c10::BFloat16>(q, k, v, mp, chunk, out, lp, nullptr, nullptr, ksp); break;
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

// The sparse draft's rows for one query (q [1, 1, H, D], scaled) in one layer, scored against an
// int8 copy of the keys kept dimension-major (kt [KH, D, >= S]: row d holds dim d of every entry;
// ks [KH, >= S] the entries' row scales), as SparQ scores keys by the query's largest dimensions.
// Per KV head: the `dims` dims where the group's sum of |q| is largest; each query row's values
// there rounded to 7 bits (scale max|q|/64); every entry of [a, b) scored by integer dot products
// (`dims_block32`), times its row scale and the query's; each row's softmax over those entries,
// summed over the group, weighs an entry. Rows out: [0, a) (sinks), the top `budget` of [a, b) by
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
  constexpr int64_t SPAN = 2048, STRIDE = 16;
  const int64_t spans = (M + SPAN - 1) / SPAN, ns = (M + STRIDE - 1) / STRIDE;
  static thread_local Scratch sc_buf;
  float* sc = sc_buf.get(static_cast<size_t>(KH * G * (M + ns)));  // exps [KH, G, M], sample [KH, G, ns]
  float* smp = sc + KH * G * M;
  std::vector<float> pmax(static_cast<size_t>(KH * spans * G)), psum(static_cast<size_t>(KH * spans * G));
  at::parallel_for(0, KH * spans, 1, [&](int64_t begin, int64_t end) {
    alignas(32) int32_t dot[8][32];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t kh = it / spans, j0 = (it % spans) * SPAN, j1 = std::min(M, j0 + SPAN);
      const int8_t* base = kd + kh * kt_h + a;
      const int64_t* dm = dim.data() + kh * dims;
      const int32_t* qp = qpat.data() + kh * G * nq;
      const float* srow = sd + kh * ks_h + a;
      __m256 mx[8];
      for (int64_t g = 0; g < G; ++g) mx[g] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      int64_t j = j0;
      for (; j + 32 <= j1; j += 32) {
        // the copy's rows are `dims` streams read 32 bytes at a time: more than the hardware
        // prefetchers follow (in a model the layer's copy comes from memory, and the choice ran at
        // a fifth of its bandwidth), so each line is asked for 1 KB ahead
        if (((a + j) & 63) == 0 && j + 1024 < j1)
          for (int64_t i = 0; i < dims; ++i) _mm_prefetch(reinterpret_cast<const char*>(base + dm[i] * kt_d + j + 1024), _MM_HINT_T0);
        for (int64_t g0 = 0; g0 < G; g0 += 4) {  // up to four rows a call: their accumulators stay in registers
          switch (std::min<int64_t>(4, G - g0)) {
            case 1: dims_block32<1>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
            case 2: dims_block32<2>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
            case 3: dims_block32<3>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
            default: dims_block32<4>(base, kt_d, dm, nq, qp + g0 * nq, j, dot + g0); break;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const __m256i off = _mm256_set1_epi32(corr[kh * G + g]);
          const __m256 qs = _mm256_set1_ps(qsc[kh * G + g]);
          for (int r = 0; r < 4; ++r) {
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
        const __m256 mv = _mm256_set1_ps(m);
        __m256 lv = _mm256_setzero_ps();
        int64_t i = j0;
        for (; i + 8 <= j1; i += 8) {
          const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + i), mv));
          _mm256_storeu_ps(sr + i, e);
          lv = _mm256_add_ps(lv, e);
        }
        float sum = hsum(lv);
        for (; i < j1; ++i) {
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
    alignas(32) float x8[8];
    int64_t j = j0;
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
// arithmetic as `kernels.quantize_q8_reference`, so both give the same bits.
void quantize_q8(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && q.sizes() == x.sizes(),
              "quantize_q8: x float32 [B, KH, T, D], q int8 of the same shape");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 3 && scale.sizes() == x.sizes().slice(0, 3),
              "quantize_q8: scale float32 [B, KH, T]");
  TORCH_CHECK(x.stride(3) == 1 && q.stride(3) == 1, "quantize_q8: last dim must be contiguous");
  const int64_t B = x.size(0), KH = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 8 == 0, "quantize_q8: head_dim must be a multiple of 8");
  const float* xd = x.data_ptr<float>();
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = scale.data_ptr<float>();
  at::parallel_for(0, B * KH * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t = it % T, h = (it / T) % KH, b = it / (T * KH);
      sd[b * scale.stride(0) + h * scale.stride(1) + t * scale.stride(2)] =
          quantize_row(xd + b * x.stride(0) + h * x.stride(1) + t * x.stride(2), D,
                       qd + b * q.stride(0) + h * q.stride(1) + t * q.stride(2));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------------------

constexpr int64_t BLOCK = 48;  // outputs per packed block: 6 vectors of 8, or 3 of 16

// The float tiles' vector: 8 lanes (AVX2) or 16 (the AVX-512 build). A lane is one output and
// runs the same operations in either width (loads, exact conversions, one FMA chain), so both
// builds give the same bits; the wider one issues half the instructions.
struct V8 {
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F half(const uint8_t* p) {  // W float16 values
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F u8(const uint8_t* p) {  // W unsigned bytes
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F s8(const uint8_t* p) {  // W signed bytes
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* p, F& lo, F& hi) {  // W bytes' low and high nibbles
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(0xF)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));
  }
};
#if defined(__AVX512F__)
struct V16 {
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F half(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F u8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F s8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(const uint8_t* p, F& lo, F& hi) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(0xF)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
  }
};
using VF = V16;
#else
using VF = V8;
#endif
constexpr int PV_ALL = BLOCK / VF::W;           // vectors in a panel's row of 48 outputs
constexpr int TILE_ROWS = VF::W == 16 ? 8 : 4;  // rows a tile holds in registers

// f(std::integral_constant<int, R>) for R = rows (1 .. TILE_ROWS): a tile's row count as a
// template argument
template <int N = 1, typename F>
inline void with_rows(int64_t rows, const F& f) {
  if constexpr (N < TILE_ROWS) {
    if (rows == N) return f(std::integral_constant<int, N>{});
    with_rows<N + 1>(rows, f);
  } else {
    f(std::integral_constant<int, N>{});
  }
}

// W [N, K] -> [ceil(N/48), K, 48], zero-padded outputs
at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_linear: float32 [N, K] expected");
  at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), NB = (N + BLOCK - 1) / BLOCK;
  at::Tensor p = at::zeros({NB, K, BLOCK}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = p.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t i = 0; i < BLOCK && nb * BLOCK + i < N; ++i) {
        const float* row = src + (nb * BLOCK + i) * K;
        for (int64_t kk = 0; kk < K; ++kk) dst[(nb * K + kk) * BLOCK + i] = row[kk];
      }
  });
  return p;
}

// R rows x PV vectors of one block, starting at vector v0 of the block's PV_ALL
// `pf`: the next block, prefetched a row of 48 a step while this one computes (a few-row product
// does enough work per byte that the hardware prefetcher alone stops streaming)
template <int R, int PV>
inline void tile(const float* x, int64_t ldx, const float* wb, int64_t K, int v0, float* y, const float* pf) {
  using V = VF;
  typename V::F acc[R][PV];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PV; ++p) acc[r][p] = V::zero();
  const float* w = wb + v0 * V::W;
  for (int64_t kk = 0; kk < K; ++kk, w += BLOCK) {
    if (pf) {
      const char* a = reinterpret_cast<const char*>(pf + kk * BLOCK);
      _mm_prefetch(a, _MM_HINT_T1);
      _mm_prefetch(a + 64, _MM_HINT_T1);
      _mm_prefetch(a + 128, _MM_HINT_T1);
    }
    typename V::F wv[PV];
    for (int p = 0; p < PV; ++p) wv[p] = V::load(w + p * V::W);
    for (int r = 0; r < R; ++r) {
      const typename V::F xb = V::bcast(x + r * ldx + kk);
      for (int p = 0; p < PV; ++p) acc[r][p] = V::fma(xb, wv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PV; ++p) V::store(y + r * BLOCK + (v0 + p) * V::W, acc[r][p]);
}

// Whether R rows take a panel's vectors in one tile (else two halves: registers)
template <int R>
constexpr bool whole_panel() { return VF::W == 16 || R <= 2; }

// Up to TILE_ROWS rows of x against one float panel [K][48] into buf [TILE_ROWS][48]
inline void panel_rows(const float* xr, int64_t ldx, const float* w, int64_t K, int64_t rows, float* buf,
                       const float* pf) {
  with_rows(rows, [&](auto RR) {
    constexpr int R = decltype(RR)::value;
    if constexpr (whole_panel<R>()) {
      tile<R, PV_ALL>(xr, ldx, w, K, 0, buf, pf);
    } else {
      tile<R, PV_ALL / 2>(xr, ldx, w, K, 0, buf, pf);
      tile<R, PV_ALL / 2>(xr, ldx, w, K, PV_ALL / 2, buf, nullptr);
    }
  });
}

// buf's rows [rows][48] (the first nn outputs, plus the bias from output n0, then the residual
// rows rd of width N when given: (xW + b) + r, the rounding of the unfused sum) into y's rows
inline void store_rows(const float* buf, int64_t rows, int64_t nn, float* y, int64_t N, int64_t n0, const float* bd,
                       const float* rd) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * N + n0;
    const float* br = buf + r * BLOCK;
    if (bd && rd)
      for (int64_t i = 0; i < nn; ++i) yr[i] = (br[i] + bd[n0 + i]) + rd[r * N + n0 + i];
    else if (bd)
      for (int64_t i = 0; i < nn; ++i) yr[i] = br[i] + bd[n0 + i];
    else if (rd)
      for (int64_t i = 0; i < nn; ++i) yr[i] = br[i] + rd[r * N + n0 + i];
    else
      std::copy(br, br + nn, yr);
  }
}

// An optional float32 vector of n elements (a bias, a norm's weight) as a pointer, nullptr when
// absent; its contiguous copy is kept alive in `keep`. The error names the op and the vector.
inline const float* vec_ptr(const c10::optional<at::Tensor>& t, int64_t n, at::Tensor& keep, const char* op,
                            const char* name) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.numel() == n, op, ": ", name, " must be float32 of ", n,
              " elements");
  return keep.data_ptr<float>();
}

// y [M, N] = x [M, K] (row stride ldx) W^T + b (+ r) against float panels [NB, K, 48]
void linear_impl(const float* xd, int64_t M, int64_t ldx, const float* wd, int64_t NB, int64_t K, int64_t N,
                 const float* bd, const float* rd, float* yd) {
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    float buf[TILE_ROWS * BLOCK];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const float* wb = wd + nb * K * BLOCK;
      const int64_t n0 = nb * BLOCK, nn = std::min(BLOCK, N - n0);
      const float* next = nb + 1 < b1 ? wb + K * BLOCK : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const float* xr = xd + m0 * ldx;
        const int64_t rows = std::min<int64_t>(TILE_ROWS, M - m0);
        panel_rows(xr, ldx, wb, K, rows, buf, m0 == 0 ? next : nullptr);
        store_rows(buf, rows, nn, yd + m0 * N, N, n0, bd, rd ? rd + m0 * N : nullptr);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// quantized linear: GGUF blocks kept at about their size (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
// K-quants Q4_K, Q5_K, Q6_K)
// ---------------------------------------------------------------------------------------------
//
// Every type's weight is w = d*q + m or w = d*q for an integer code q, with d and m made from the
// file's float16 fields and small integer scales:
//   Q4_0 d*(q-8), Q4_1 d*q + m, Q5_0 d*(q-16), Q5_1 d*q + m, Q8_0 d*q (d, m float16 a block of 32);
//   Q4_K, Q5_K: (d*sc)*q - (dmin*mn), sc and mn 6-bit per 32 inputs, d and dmin float16 per 256;
//   Q6_K: (d*sc)*(q-32), sc int8 per 16 inputs, d float16 per 256.
// d*sc is exact in float32 (11 bits times at most 8), and so is (d*sc)*q except for Q6_K (11 + 8
// + 6 bits). So fma(q, d, m) (m = -8d for Q4_0, -(dmin*mn) for the K-quants) rounds exactly where
// the reference dequantization rounds (its product is exact, its sum rounds once), and Q8_0, Q5_0
// (as Q8_0 with codes q-16) and Q6_K take (d*sc)*q in the reference's order: every weight is the
// float32 value a dequantized checkpoint holds. Each output is then one FMA chain over k =
// 0..K-1 as in `linear`, so the result equals `linear` on the dequantized weights bit for bit,
// whatever the number of rows.
//
// Packed layout: panels of 48 outputs, each [K/32 blocks][PB bytes]: a header of per-output
// fields, then the codes. Q4 codes (Q4_0, Q4_1, Q4_K): 16 rows of 48 bytes, byte (j, i) holding
// inputs 2j (low nibble) and 2j+1 (high) of output i; the others: 32 rows of 48 bytes, one code
// each (int8 for Q8_0 and Q6_K, unsigned below 32 for Q5_1 and Q5_K). Headers (48 of each):
//   Q4_0, Q8_0 (and Q5_0): d f16 | Q4_1, Q5_1: d f16, m f16 |
//   Q4_K, Q5_K: d f16, dmin f16, sc u8, mn u8 (this block's) | Q6_K: d f16, sc int8 x 2 (inputs 0-15, 16-31)
// The K-quants' per-256 fields are repeated in each of their 8 blocks: 5.5 bits a Q4_K weight
// (the file's 4.5), 9 a Q5_K or Q6_K weight (5.5, 6.56): one layout and one set of tiles for all.

constexpr int QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7, QT_Q8_0 = 8, QT_Q4_K = 12, QT_Q5_K = 13,
              QT_Q6_K = 14;  // ggml's type ids

inline bool known_qt(int64_t qt) {
  return qt == QT_Q4_0 || qt == QT_Q4_1 || qt == QT_Q5_0 || qt == QT_Q5_1 || qt == QT_Q8_0 || qt == QT_Q4_K ||
         qt == QT_Q5_K || qt == QT_Q6_K;
}
// the panel format a file type is multiplied in (Q5_0 codes shifted by -16 are Q8_0's)
inline int panel_qt(int64_t qt) { return qt == QT_Q5_0 ? QT_Q8_0 : static_cast<int>(qt); }
inline bool kquant(int64_t qt) { return qt == QT_Q4_K || qt == QT_Q5_K || qt == QT_Q6_K; }
constexpr bool nibbles(int qt) { return qt == QT_Q4_0 || qt == QT_Q4_1 || qt == QT_Q4_K; }
// w = q*d (no offset): Q8_0, Q6_K; else fma(q, d, m)
constexpr bool mul_only(int qt) { return qt == QT_Q8_0 || qt == QT_Q6_K; }
inline int64_t file_block_inputs(int64_t qt) { return kquant(qt) ? 256 : 32; }
inline int64_t file_block_bytes(int64_t qt) {
  switch (qt) {
    case QT_Q4_0: return 18;
    case QT_Q4_1: return 20;
    case QT_Q5_0: return 22;
    case QT_Q5_1: return 24;
    case QT_Q8_0: return 34;
    case QT_Q4_K: return 144;
    case QT_Q5_K: return 176;
    default: return 210;  // Q6_K
  }
}
constexpr int codes_at(int pqt) {
  return pqt == QT_Q4_0 || pqt == QT_Q8_0 ? 96 : pqt == QT_Q4_K || pqt == QT_Q5_K ? 288 : 192;
}
inline int64_t panel_block_bytes(int64_t qt) {
  const int p = panel_qt(qt);
  return codes_at(p) + (nibbles(p) ? 768 : 1536);
}
inline void check_qt(int64_t qt) {
  TORCH_CHECK(known_qt(qt), "quantized linear: type ", qt,
              " is not Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12), Q5_K (13) or Q6_K (14)");
}

// The scales of vector v (outputs v*W .. v*W+W-1) of one panel block: w = fma(q, d, m), or q*d
// for `mul_only` types; d0 for the block's inputs 0-15, d1 for 16-31 (equal but for Q6_K).
template <int QT, typename V>
inline void vec_scales(const uint8_t* blk, int v, typename V::F& d0, typename V::F& d1, typename V::F& m) {
  const int o = v * V::W;  // the vector's first output
  const typename V::F d = V::half(blk + 2 * o);
  if constexpr (QT == QT_Q4_K || QT == QT_Q5_K) {
    d0 = d1 = V::mul(d, V::u8(blk + 192 + o));
    m = V::sub(V::zero(), V::mul(V::half(blk + 96 + 2 * o), V::u8(blk + 240 + o)));
  } else if constexpr (QT == QT_Q6_K) {
    d0 = V::mul(d, V::s8(blk + 96 + o));
    d1 = V::mul(d, V::s8(blk + 144 + o));
    m = V::zero();
  } else {
    d0 = d1 = d;
    m = QT == QT_Q4_1 || QT == QT_Q5_1 ? V::half(blk + 96 + 2 * o)
        : QT == QT_Q4_0               ? V::mul(d, V::set1(-8.0f))
                                      : V::zero();
  }
}

// The weights of inputs (2j, 2j+1) of a block for the W outputs of a vector (codes: the block's
// codes from the vector's first output), with scale d (d0 or d1 of `vec_scales`) and offset m.
template <int QT, typename V>
inline void weights_at(const uint8_t* codes, int j, typename V::F d, typename V::F m, typename V::F& w0,
                       typename V::F& w1) {
  typename V::F q0, q1;
  if constexpr (nibbles(QT)) {
    V::nibbles(codes + j * BLOCK, q0, q1);
  } else {
    q0 = V::s8(codes + 2 * j * BLOCK);
    q1 = V::s8(codes + (2 * j + 1) * BLOCK);
  }
  if constexpr (mul_only(QT)) {
    w0 = V::mul(q0, d);
    w1 = V::mul(q1, d);
  } else {
    w0 = V::fma(q0, d, m);
    w1 = V::fma(q1, d, m);
  }
}

// One 32-input block of a file row, decoded: the header fields of `panel_qt(qt)` and 32 codes
// (as the panel stores them).
struct Block32 {
  uint16_t d = 0, m = 0;  // float16 bits: d, and m (Q4_1, Q5_1) or dmin (Q4_K, Q5_K)
  uint8_t s0 = 0, s1 = 0;  // Q4_K/Q5_K: sc, mn; Q6_K: the int8 scales of inputs 0-15, 16-31
  uint8_t q[32];
};

// Q4_K/Q5_K's 6-bit scale and min of sub-block j (0..7) from the 12 scale bytes
inline void scale_min_k4(int j, const uint8_t* s, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// block kb (inputs kb*32 ..) of a file row of type qt
inline void decode32(int64_t qt, const uint8_t* row, int64_t kb, Block32& o) {
  if (kquant(qt)) {
    const int s = static_cast<int>(kb % 8);
    const uint8_t* b = row + (kb / 8) * file_block_bytes(qt);
    if (qt == QT_Q6_K) {  // ql[128] qh[64] sc[16] d
      const int n = s / 4, g = s % 4;
      const uint8_t* ql = b + 64 * n + 32 * (g % 2);
      const uint8_t* qh = b + 128 + 32 * n;
      for (int l = 0; l < 32; ++l) {
        const int c = ((ql[l] >> (4 * (g / 2))) & 0xF) | (((qh[l] >> (2 * g)) & 3) << 4);
        o.q[l] = static_cast<uint8_t>(static_cast<int8_t>(c - 32));
      }
      o.s0 = b[192 + 8 * n + 2 * g];
      o.s1 = b[192 + 8 * n + 2 * g + 1];
      std::memcpy(&o.d, b + 208, 2);
      return;
    }
    // Q4_K: d dmin sc[12] qs[128]; Q5_K: d dmin sc[12] qh[32] qs[128]
    std::memcpy(&o.d, b, 2);
    std::memcpy(&o.m, b + 2, 2);
    scale_min_k4(s, b + 4, o.s0, o.s1);
    const uint8_t* qs = b + (qt == QT_Q4_K ? 16 : 48) + 32 * (s / 2);
    for (int l = 0; l < 32; ++l) {
      int c = (qs[l] >> (4 * (s % 2))) & 0xF;
      if (qt == QT_Q5_K) c |= ((b[16 + l] >> s) & 1) << 4;
      o.q[l] = static_cast<uint8_t>(c);
    }
    return;
  }
  const uint8_t* b = row + kb * file_block_bytes(qt);
  std::memcpy(&o.d, b, 2);
  if (qt == QT_Q8_0) {
    std::memcpy(o.q, b + 2, 32);
    return;
  }
  if (qt == QT_Q4_1 || qt == QT_Q5_1) std::memcpy(&o.m, b + 2, 2);
  const bool five = qt == QT_Q5_0 || qt == QT_Q5_1;
  uint32_t qh = 0;
  if (five) std::memcpy(&qh, b + (qt == QT_Q5_1 ? 4 : 2), 4);
  const uint8_t* qs = b + (qt == QT_Q4_0 ? 2 : qt == QT_Q4_1 ? 4 : qt == QT_Q5_0 ? 6 : 8);
  // byte j holds input j (low nibble) and input j+16 (high); Q5's fifth bits: qh bit k for input k
  for (int j = 0; j < 16; ++j) {
    int lo = qs[j] & 0xF, hi = qs[j] >> 4;
    if (five) {
      lo |= ((qh >> j) & 1) << 4;
      hi |= ((qh >> (j + 16)) & 1) << 4;
    }
    if (qt == QT_Q5_0) lo -= 16, hi -= 16;
    o.q[j] = static_cast<uint8_t>(static_cast<int8_t>(lo));
    o.q[j + 16] = static_cast<uint8_t>(static_cast<int8_t>(hi));
  }
}

// A panel block's per-output header fields: (offset, bytes) each, 48 outputs of each
struct HeaderField {
  int at, size;
};
inline std::vector<HeaderField> header_fields(int pqt) {
  switch (pqt) {
    case QT_Q4_1:
    case QT_Q5_1: return {{0, 2}, {96, 2}};
    case QT_Q4_K:
    case QT_Q5_K: return {{0, 2}, {96, 2}, {192, 1}, {240, 1}};
    case QT_Q6_K: return {{0, 2}, {96, 1}, {144, 1}};
    default: return {{0, 2}};
  }
}

// raw [N, file row bytes] uint8 (a GGUF tensor's rows) -> [ceil(N/48), K/32, PB] uint8
at::Tensor pack_q(const at::Tensor& raw, int64_t qt, int64_t K) {
  check_qt(qt);
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte, "pack_q: uint8 [N, bytes] expected");
  const int64_t FI = file_block_inputs(qt), FB = file_block_bytes(qt);
  TORCH_CHECK(K % FI == 0 && raw.size(1) == K / FI * FB, "pack_q: ", raw.size(1), " bytes a row do not hold ", K,
              " inputs of this type");
  at::Tensor rc = raw.contiguous();
  const int pqt = panel_qt(qt);
  const int64_t N = rc.size(0), KB = K / 32, NB = (N + BLOCK - 1) / BLOCK, PB = panel_block_bytes(qt),
                RB = rc.size(1), CA = codes_at(pqt);
  at::Tensor p = at::zeros({NB, KB, PB}, rc.options());
  const uint8_t* src = rc.data_ptr<uint8_t>();
  uint8_t* dst = p.data_ptr<uint8_t>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    Block32 blk;
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t kb = 0; kb < KB; ++kb) {
        uint8_t* o = dst + (nb * KB + kb) * PB;
        uint8_t* codes = o + CA;
        for (int64_t i = 0; i < BLOCK && nb * BLOCK + i < N; ++i) {
          decode32(qt, src + (nb * BLOCK + i) * RB, kb, blk);
          std::memcpy(o + 2 * i, &blk.d, 2);
          if (pqt == QT_Q4_1 || pqt == QT_Q5_1 || pqt == QT_Q4_K || pqt == QT_Q5_K) std::memcpy(o + 96 + 2 * i, &blk.m, 2);
          if (pqt == QT_Q4_K || pqt == QT_Q5_K) o[192 + i] = blk.s0, o[240 + i] = blk.s1;
          if (pqt == QT_Q6_K) o[96 + i] = blk.s0, o[144 + i] = blk.s1;
          if (nibbles(pqt))
            for (int j = 0; j < 16; ++j) codes[j * BLOCK + i] = uint8_t(blk.q[2 * j] | (blk.q[2 * j + 1] << 4));
          else
            for (int k = 0; k < 32; ++k) codes[k * BLOCK + i] = blk.q[k];
        }
      }
  });
  return p;
}

// R rows x PV vectors of one panel from vector v0, dequantizing each code once for the R rows
template <int QT, int R, int PV>
inline void qtile(const float* x, int64_t ldx, const uint8_t* wb, int64_t KB, int v0, float* y) {
  using V = VF;
  using F = typename V::F;
  const int64_t PB = panel_block_bytes(QT);
  F acc[R][PV];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PV; ++p) acc[r][p] = V::zero();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* blk = wb + kb * PB;
    F d0[PV], d1[PV], m[PV];
    for (int p = 0; p < PV; ++p) vec_scales<QT, V>(blk, v0 + p, d0[p], d1[p], m[p]);
    const uint8_t* codes = blk + codes_at(QT) + v0 * V::W;
    const float* xk = x + kb * 32;
    for (int j = 0; j < 16; ++j) {
      for (int p = 0; p < PV; ++p) {
        F w0, w1;
        weights_at<QT, V>(codes + p * V::W, j, j < 8 ? d0[p] : d1[p], m[p], w0, w1);
        // the broadcasts read in the FMA (an embedded broadcast on AVX-512): registers for the rows
        for (int r = 0; r < R; ++r) acc[r][p] = V::fma(V::bcast(xk + r * ldx + 2 * j), w0, acc[r][p]);
        for (int r = 0; r < R; ++r) acc[r][p] = V::fma(V::bcast(xk + r * ldx + 2 * j + 1), w1, acc[r][p]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PV; ++p) V::store(y + r * BLOCK + (v0 + p) * V::W, acc[r][p]);
}

// A whole panel dequantized into `out` in `linear`'s layout [K][48] (for passes of many rows)
template <int QT>
inline void dequant_panel(const uint8_t* wb, int64_t KB, float* out) {
  using V = VF;
  const int64_t PB = panel_block_bytes(QT);
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* blk = wb + kb * PB;
    for (int v = 0; v < PV_ALL; ++v) {
      typename V::F d0, d1, m;
      vec_scales<QT, V>(blk, v, d0, d1, m);
      for (int j = 0; j < 16; ++j) {
        typename V::F w0, w1;
        weights_at<QT, V>(blk + codes_at(QT) + v * V::W, j, j < 8 ? d0 : d1, m, w0, w1);
        V::store(out + (kb * 32 + 2 * j) * BLOCK + v * V::W, w0);
        V::store(out + (kb * 32 + 2 * j + 1) * BLOCK + v * V::W, w1);
      }
    }
  }
}

// Rows up to which a panel is multiplied straight from its codes; above, it is dequantized once
// into a buffer and run through `linear`'s float tile (the same weights, the same FMA order).
constexpr int64_t QDIRECT_ROWS = 8;

// y rows of stride ldy (N: a whole matrix; wider: a part of a stack, `Weight::parts`)
template <int QT>
void qlinear_impl(const float* xd, int64_t M, int64_t ldx, const uint8_t* wd, int64_t NB, int64_t KB, int64_t N,
                  const float* bd, const float* rd, float* yd, int64_t ldy) {
  const int64_t PB = panel_block_bytes(QT), K = KB * 32;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    float buf[TILE_ROWS * BLOCK];
    std::vector<float> dense(M > QDIRECT_ROWS ? K * BLOCK : 0);
    for (int64_t nb = b0; nb < b1; ++nb) {
      const uint8_t* wb = wd + nb * KB * PB;
      const int64_t n0 = nb * BLOCK, nn = std::min(BLOCK, N - n0);
      if (M > QDIRECT_ROWS) dequant_panel<QT>(wb, KB, dense.data());
      for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const float* xr = xd + m0 * ldx;
        const int64_t rows = std::min<int64_t>(TILE_ROWS, M - m0);
        if (M > QDIRECT_ROWS) {
          panel_rows(xr, ldx, dense.data(), K, rows, buf, nullptr);
        } else {
          with_rows(rows, [&](auto RR) {
            constexpr int R = decltype(RR)::value;
            if constexpr (VF::W == 16 && R > 4) {  // a vector at a time: the scales and 8 rows' sums in registers
              for (int v = 0; v < PV_ALL; ++v) qtile<QT, R, 1>(xr, ldx, wb, KB, v, buf);
            } else if constexpr (whole_panel<R>()) {
              qtile<QT, R, PV_ALL>(xr, ldx, wb, KB, 0, buf);
            } else {
              qtile<QT, R, PV_ALL / 2>(xr, ldx, wb, KB, 0, buf);
              qtile<QT, R, PV_ALL / 2>(xr, ldx, wb, KB, PV_ALL / 2, buf);
            }
          });
        }
        store_rows(buf, rows, nn, yd + m0 * ldy, ldy, n0, bd, rd ? rd + m0 * ldy : nullptr);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// quantized linear over int8 activations (optional: llama.cpp's arithmetic, a different model)
// ---------------------------------------------------------------------------------------------
//
// Each row of x is rounded per block of 32 inputs to int8 codes with one scale, dx = max|x| / 127
// (codes round-to-even(x / dx), as `quantize_row`), and each output's block sum is then an exact
// integer: sum_k qw_k qx_k, over the same panels as `qlinear`, for every block type. Per block
// and output the float result is acc = fma(float(isum), dw * dx, acc), then for types with an
// offset (Q4_1, Q5_1: m; Q4_K, Q5_K: -dmin*mn) acc = fma(mw, dx * sum_k qx_k, acc); Q4_0's -8
// is taken in the integer sum, and Q6_K's two scales (inputs 0-15, 16-31) take two sums and two
// FMAs. dw = d (the float16 field) or d*sc for the K-quants, exact in float32 as in `vec_scales`.
// Blocks in order. A row's bits depend only on that row, so passes stay row-invariant, but the
// products are not the float model's. (llama.cpp rounds the K-quants' activations per 256 inputs,
// Q8_K; here every type takes the same per-32 rounding, the finer of the two.)
//
// Lanes: 16 outputs a vector, each 16-bit lane holding the codes of inputs 2j and 2j+1 of one
// output, against the row's (qx_2j, qx_2j+1) pair broadcast: maddubs gives each output's two
// products summed, 32 products an instruction; sums of a few such pairs stay within int16 and are
// then widened to int32.

// M rows [M, K] -> codes [M, K], scales [M, K/32], code sums [M, K/32] and the sums of each
// block's first 16 codes [M, K/32]
void quantize_rows_q8(const float* x, int64_t M, int64_t ldx, int64_t K, int8_t* q, float* d, int32_t* sx,
                      int32_t* sh) {
  const int64_t KB = K / 32;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t kb = 0; kb < KB; ++kb) {
        int8_t* qb = q + m * K + kb * 32;
        d[m * KB + kb] = quantize_row(x + m * ldx + kb * 32, 32, qb);
        int32_t s = 0;
        for (int k = 0; k < 16; ++k) s += qb[k];
        sh[m * KB + kb] = s;
        for (int k = 16; k < 32; ++k) s += qb[k];
        sx[m * KB + kb] = s;
      }
  });
}

// what a type's integer sums need: signed codes (Q8_0 and Q5_0 as Q8_0, Q6_K's q-32), an offset
// m (its own field or -dmin*mn), a scale per 16 inputs (Q6_K)
constexpr bool signed_codes(int qt) { return qt == QT_Q8_0 || qt == QT_Q6_K; }
constexpr bool has_min(int qt) { return qt == QT_Q4_1 || qt == QT_Q5_1 || qt == QT_Q4_K || qt == QT_Q5_K; }
constexpr bool two_scales(int qt) { return qt == QT_Q6_K; }

// The epilogue's scales of the W outputs from output o of a panel block: dw (dw1 the second
// half's, Q6_K), mw (types with an offset), by `vec_scales`' float32 operations.
template <int QT, typename V>
inline void act8_scales(const uint8_t* blk, int o, typename V::F& dw, typename V::F& dw1, typename V::F& mw) {
  const typename V::F d = V::half(blk + 2 * o);
  dw = dw1 = d;
  mw = V::zero();
  if constexpr (QT == QT_Q4_K || QT == QT_Q5_K) {
    dw = dw1 = V::mul(d, V::u8(blk + 192 + o));
    mw = V::sub(V::zero(), V::mul(V::half(blk + 96 + 2 * o), V::u8(blk + 240 + o)));
  } else if constexpr (QT == QT_Q6_K) {
    dw = V::mul(d, V::s8(blk + 96 + o));
    dw1 = V::mul(d, V::s8(blk + 144 + o));
  } else if constexpr (QT == QT_Q4_1 || QT == QT_Q5_1) {
    mw = V::half(blk + 96 + 2 * o);
  }
}

#if !defined(__AVX512VNNI__)
// R (1 to 8) rows x 16 outputs (group g of the panel) over every block -> y[r * 48 + g * 16 ...]
template <int QT, int R>
inline void qtile_i8(const __m256i* xb, int64_t K, const float* dx, const int32_t* sx, const uint8_t* wb, int64_t KB,
                     int g, float* y) {
  const int64_t PB = panel_block_bytes(QT);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi16(0x000F), hi4 = _mm256_set1_epi16(0x00F0);
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* blk = wb + kb * PB;
    const uint8_t* codes = blk + codes_at(QT) + g * 16;
    __m256i s32[R][2][2];  // [row][inputs 0-15, 16-31][outputs 0-7, 8-15]
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) s32[r][h][0] = s32[r][h][1] = _mm256_setzero_si256();
    // pairs summed in int16 before widening: 8 of nibbles (8 * 2 * 15 * 127), 4 of Q5's or Q6_K's
    // codes (4 * 2 * 32 * 127), 1 of Q8_0's (2 * 128 * 127)
    constexpr int GP = nibbles(QT) ? 8 : QT == QT_Q8_0 ? 1 : 4;
    for (int j0 = 0; j0 < 16; j0 += GP) {
      __m256i s16[R];
      for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
      for (int j = j0; j < j0 + GP; ++j) {
        __m256i w;
        if constexpr (nibbles(QT)) {
          const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j * BLOCK)));
          w = _mm256_or_si256(_mm256_and_si256(c, lo4), _mm256_slli_epi16(_mm256_and_si256(c, hi4), 4));
        } else {
          const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 2 * j * BLOCK));
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (2 * j + 1) * BLOCK));
          w = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));
        }
        if constexpr (signed_codes(QT)) {  // |w| times x with w's sign: maddubs takes unsigned first
          const __m256i wa = _mm256_sign_epi8(w, w);
          for (int r = 0; r < R; ++r)
            s16[r] = _mm256_add_epi16(
                s16[r], _mm256_maddubs_epi16(wa, _mm256_sign_epi8(_mm256_load_si256(xb + r * (K / 2) + kb * 16 + j), w)));
        } else {
          for (int r = 0; r < R; ++r)
            s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(w, _mm256_load_si256(xb + r * (K / 2) + kb * 16 + j)));
        }
      }
      const int h = j0 / 8;
      for (int r = 0; r < R; ++r) {
        s32[r][h][0] = _mm256_add_epi32(s32[r][h][0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[r])));
        s32[r][h][1] = _mm256_add_epi32(s32[r][h][1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[r], 1)));
      }
    }
    for (int oh = 0; oh < 2; ++oh) {
      __m256 dw, dw1, mw;
      act8_scales<QT, V8>(blk, g * 16 + oh * 8, dw, dw1, mw);
      for (int r = 0; r < R; ++r) {
        const float dxr = dx[r * KB + kb];
        if constexpr (two_scales(QT)) {
          acc[r][oh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r][0][oh]), _mm256_mul_ps(dw, _mm256_set1_ps(dxr)), acc[r][oh]);
          acc[r][oh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r][1][oh]), _mm256_mul_ps(dw1, _mm256_set1_ps(dxr)), acc[r][oh]);
        } else {
          __m256i is = _mm256_add_epi32(s32[r][0][oh], s32[r][1][oh]);
          if (QT == QT_Q4_0) is = _mm256_sub_epi32(is, _mm256_set1_epi32(8 * sx[r * KB + kb]));
          acc[r][oh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(dw, _mm256_set1_ps(dxr)), acc[r][oh]);
          if constexpr (has_min(QT))
            acc[r][oh] = _mm256_fmadd_ps(mw, _mm256_set1_ps(dxr * static_cast<float>(sx[r * KB + kb])), acc[r][oh]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + r * BLOCK + g * 16 + h * 8, acc[r][h]);
}
#endif

#if defined(__AVX512VNNI__)
// The same integer block sums by VNNI (the AVX-512 build): each 32-bit lane is one output, its
// four bytes the codes of inputs 4t..4t+3, against the row's four int8 codes broadcast, and
// vpdpbusd adds the four products into the lane: 64 products an instruction. Its first operand
// is unsigned, so signed codes enter as q + 128 (q xor 0x80) and 128 * sum(qx) is taken back;
// the other types' codes are unsigned already. The sums are the same integers as `qtile_i8`'s
// and the float epilogue is its, lane for lane: the same bits.
template <int QT, int R>
inline void qtile_vnni(const int8_t* xq, int64_t K, const float* dx, const int32_t* sx, const int32_t* sh,
                       const uint8_t* wb, int64_t KB, int g, float* y) {
  const int64_t PB = panel_block_bytes(QT);
  constexpr int H = two_scales(QT) ? 2 : 1;  // sums kept apart: inputs 0-15 and 16-31 (Q6_K)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* blk = wb + kb * PB;
    const uint8_t* codes = blk + codes_at(QT) + g * 16;
    __m512i s32[R][H];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < H; ++h) s32[r][h] = _mm512_setzero_si512();
    for (int t = 0; t < 8; ++t) {
      __m512i w;
      if constexpr (nibbles(QT)) {  // bytes 2t, 2t+1 hold inputs (4t, 4t+1) and (4t+2, 4t+3) as nibble pairs
        const __m512i e0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 2 * t * BLOCK)));
        const __m512i e1 =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (2 * t + 1) * BLOCK)));
        const __m512i v = _mm512_or_si512(e0, _mm512_slli_epi32(e1, 16));
        w = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0x000F000F)),
                            _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x00F000F0)), 4));
      } else {  // inputs 4t..4t+3: four rows of 16 outputs, interleaved by output
        auto row = [&](int k) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * BLOCK)); };
        const __m128i a0 = row(4 * t), a1 = row(4 * t + 1), a2 = row(4 * t + 2), a3 = row(4 * t + 3);
        const __m128i l01 = _mm_unpacklo_epi8(a0, a1), h01 = _mm_unpackhi_epi8(a0, a1);
        const __m128i l23 = _mm_unpacklo_epi8(a2, a3), h23 = _mm_unpackhi_epi8(a2, a3);
        w = _mm512_castsi128_si512(_mm_unpacklo_epi16(l01, l23));
        w = _mm512_inserti32x4(w, _mm_unpackhi_epi16(l01, l23), 1);
        w = _mm512_inserti32x4(w, _mm_unpacklo_epi16(h01, h23), 2);
        w = _mm512_inserti32x4(w, _mm_unpackhi_epi16(h01, h23), 3);
        if constexpr (signed_codes(QT)) w = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
      }
      const int h = H == 2 ? t / 4 : 0;
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, xq + r * K + kb * 32 + 4 * t, 4);
        s32[r][h] = _mm512_dpbusd_epi32(s32[r][h], w, _mm512_set1_epi32(quad));
      }
    }
    __m512 dw, dw1, mw;
    act8_scales<QT, V16>(blk, g * 16, dw, dw1, mw);
    for (int r = 0; r < R; ++r) {
      const float dxr = dx[r * KB + kb];
      const int32_t sr = sx[r * KB + kb], s0 = sh[r * KB + kb];
      if constexpr (two_scales(QT)) {
        const __m512i i0 = _mm512_sub_epi32(s32[r][0], _mm512_set1_epi32(128 * s0));
        const __m512i i1 = _mm512_sub_epi32(s32[r][H - 1], _mm512_set1_epi32(128 * (sr - s0)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(dw, _mm512_set1_ps(dxr)), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(dw1, _mm512_set1_ps(dxr)), acc[r]);
      } else {
        __m512i is = s32[r][0];
        if (signed_codes(QT)) is = _mm512_sub_epi32(is, _mm512_set1_epi32(128 * sr));
        if (QT == QT_Q4_0) is = _mm512_sub_epi32(is, _mm512_set1_epi32(8 * sr));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, _mm512_set1_ps(dxr)), acc[r]);
        if constexpr (has_min(QT))
          acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dxr * static_cast<float>(sr)), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * BLOCK + g * 16, acc[r]);
}
#endif

// y rows of stride ldy (N: a whole matrix; wider: a part of a stack)
template <int QT>
void qlinear_i8_impl(const float* xd, int64_t M, int64_t ldx, const uint8_t* wd, int64_t NB, int64_t KB, int64_t N,
                     const float* bd, const float* rd, float* yd, int64_t ldy) {
  const int64_t PB = panel_block_bytes(QT), K = KB * 32;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * KB);
  std::vector<int32_t> sx(M * KB), sh(M * KB);
  quantize_rows_q8(xd, M, ldx, K, xq.data(), dx.data(), sx.data(), sh.data());
#if !defined(__AVX512VNNI__)
  // every pair (x_2j, x_2j+1) broadcast to a vector once, read by a plain load in the tiles
  std::unique_ptr<__m256i[]> xb(new __m256i[M * K / 2]);
  for (int64_t i = 0; i < M * K / 2; ++i) {
    int16_t pair;
    std::memcpy(&pair, xq.data() + 2 * i, 2);
    xb[i] = _mm256_set1_epi16(pair);
  }
#endif
  // up to 8 rows share each expanded code vector (the codes' unpacking is most of a row's work)
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    float buf[8 * BLOCK];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const uint8_t* wb = wd + nb * KB * PB;
      const int64_t n0 = nb * BLOCK, nn = std::min(BLOCK, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t rows = std::min<int64_t>(8, M - m0);
        const float* dr = dx.data() + m0 * KB;
        const int32_t* sr = sx.data() + m0 * KB;
        for (int g = 0; g < 3; ++g) {
          auto run = [&](auto RR) {
            constexpr int R = decltype(RR)::value;
#if defined(__AVX512VNNI__)
            qtile_vnni<QT, R>(xq.data() + m0 * K, K, dr, sr, sh.data() + m0 * KB, wb, KB, g, buf);
#else
            qtile_i8<QT, R>(xb.get() + m0 * K / 2, K, dr, sr, wb, KB, g, buf);
#endif
          };
          switch (rows) {
            case 1: run(std::integral_constant<int, 1>{}); break;
            case 2: run(std::integral_constant<int, 2>{}); break;
            case 3: run(std::integral_constant<int, 3>{}); break;
            case 4: run(std::integral_constant<int, 4>{}); break;
            case 5: run(std::integral_constant<int, 5>{}); break;
            case 6: run(std::integral_constant<int, 6>{}); break;
            case 7: run(std::integral_constant<int, 7>{}); break;
            default: run(std::integral_constant<int, 8>{}); break;
          }
        }
        store_rows(buf, rows, nn, yd + m0 * ldy, ldy, n0, bd, rd ? rd + m0 * ldy : nullptr);
      }
    }
  });
}

// A packed weight matrix as the kernels take it: float32 panels (qt 0), GGUF blocks (qt: ggml's
// id) or a stack of block matrices of different types (qt MIXED: `parts`, rows one after another).
struct Weight {
  int64_t qt = 0, N = 0, K = 0, NB = 0;
  bool act8 = false;  // int8 activations (qt | ACT8 from Python)
  const float* f = nullptr;
  const uint8_t* q = nullptr;
  std::vector<Weight> parts;
};

constexpr int64_t ACT8 = 256;
// A fused matrix whose parts hold different block types (a Q4_K_M file's Q4_K q and k with its
// Q6_K v): uint8 [bytes], an int64 header [2 + 3 * parts] = parts, K, then per part its type, its
// rows and the byte offset of its panels (`pack_q`'s, whole) in the buffer. Each output is its
// part's, so the stack gives each part's bits.
constexpr int64_t MIXED = 512;

Weight weight_of(const at::Tensor& packed, int64_t qt, int64_t N, const char* op) {
  Weight w;
  w.act8 = (qt & ACT8) != 0 && qt != 0;
  qt &= ~ACT8;
  w.qt = qt;
  w.N = N;
  if (qt == MIXED) {
    TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() >= 16,
                op, ": a stack must be uint8 [bytes] with its header");
    const uint8_t* base = packed.data_ptr<uint8_t>();
    int64_t head[2];
    std::memcpy(head, base, 16);
    const int64_t np = head[0], K = head[1], bytes = packed.numel();
    TORCH_CHECK(np >= 1 && np <= 16 && K > 0 && K % 32 == 0 && 16 + 24 * np <= bytes, op, ": a stack's header is damaged");
    std::vector<int64_t> h(3 * np);
    std::memcpy(h.data(), base + 16, 24 * np);
    int64_t rows = 0;
    for (int64_t i = 0; i < np; ++i) {
      Weight p;
      p.qt = h[3 * i];
      p.act8 = w.act8;
      p.N = h[3 * i + 1];
      check_qt(p.qt);
      p.K = K;
      p.NB = (p.N + BLOCK - 1) / BLOCK;
      const int64_t off = h[3 * i + 2], size = p.NB * (K / 32) * panel_block_bytes(p.qt);
      TORCH_CHECK(p.N >= 1 && off >= 16 + 24 * np && off + size <= bytes, op, ": a stack's part ", i, " lies outside it");
      p.q = base + off;
      rows += p.N;
      w.parts.push_back(p);
    }
    TORCH_CHECK(rows == N, op, ": N = ", N, " is not the stack's ", rows, " rows");
    w.K = K;
    return w;
  }
  if (qt == 0) {
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.size(2) == BLOCK &&
                    packed.is_contiguous(), op, ": packed float32 [NB, K, 48] expected");
    w.NB = packed.size(0);
    w.K = packed.size(1);
    w.f = packed.data_ptr<float>();
  } else {
    check_qt(qt);
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                    packed.size(2) == panel_block_bytes(qt), op, ": packed [NB, K/32, PB] uint8 expected");
    w.NB = packed.size(0);
    w.K = packed.size(1) * 32;
    w.q = packed.data_ptr<uint8_t>();
  }
  TORCH_CHECK(N <= w.NB * BLOCK && N > w.NB * BLOCK - BLOCK, op, ": N = ", N, " does not fit the packed panels");
  return w;
}

// y [M, N] = x [M, K] (row stride ldx) W^T + b, plus the residual rows rd [M, N] when given
void matmul_into(const Weight& w, const float* xd, int64_t M, int64_t ldx, const float* bd, const float* rd,
                 float* yd, int64_t ldy = 0) {
  const int64_t KB = w.K / 32;
  if (ldy == 0) ldy = w.N;
  if (!w.parts.empty()) {  // each part into its columns of y
    int64_t c = 0;
    for (const Weight& p : w.parts) {
      matmul_into(p, xd, M, ldx, bd ? bd + c : nullptr, rd ? rd + c : nullptr, yd + c, ldy);
      c += p.N;
    }
    return;
  }
  const int pqt = w.qt ? panel_qt(w.qt) : 0;
  if (w.act8) {
    switch (pqt) {
      case QT_Q4_0: qlinear_i8_impl<QT_Q4_0>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
      case QT_Q4_1: qlinear_i8_impl<QT_Q4_1>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
      case QT_Q5_1: qlinear_i8_impl<QT_Q5_1>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
      case QT_Q4_K: qlinear_i8_impl<QT_Q4_K>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
      case QT_Q5_K: qlinear_i8_impl<QT_Q5_K>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
      case QT_Q6_K: qlinear_i8_impl<QT_Q6_K>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
      default: qlinear_i8_impl<QT_Q8_0>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); return;
    }
  }
  TORCH_CHECK(pqt != 0 || ldy == w.N, "matmul: float panels take no column stride");
  switch (pqt) {
    case 0: linear_impl(xd, M, ldx, w.f, w.NB, w.K, w.N, bd, rd, yd); break;
    case QT_Q4_0: qlinear_impl<QT_Q4_0>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
    case QT_Q4_1: qlinear_impl<QT_Q4_1>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
    case QT_Q5_1: qlinear_impl<QT_Q5_1>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
    case QT_Q4_K: qlinear_impl<QT_Q4_K>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
    case QT_Q5_K: qlinear_impl<QT_Q5_K>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
    case QT_Q6_K: qlinear_impl<QT_Q6_K>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
    default: qlinear_impl<QT_Q8_0>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); break;
  }
}

// x [..., K] -> [..., N]: the op behind both `linear` (float panels) and `qlinear` (blocks)
at::Tensor matmul_op(const at::Tensor& x, const Weight& w, const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": float32 input expected");
  TORCH_CHECK(x.size(-1) == w.K, op, ": input width ", x.size(-1), " != ", w.K);
  at::Tensor x2 = x.reshape({-1, w.K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.N;
  at::Tensor y = at::empty({x2.size(0), w.N}, x.options());
  at::Tensor bc;
  const float* bd = vec_ptr(bias, w.N, bc, op, "bias");
  matmul_into(w, x2.data_ptr<float>(), x2.size(0), x2.stride(0), bd, nullptr, y.data_ptr<float>());
  return y.view(shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& bias) {
  return matmul_op(x, weight_of(packed, 0, N, "linear"), bias, "linear");
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, int64_t qt, int64_t N,
                   const c10::optional<at::Tensor>& bias) {
  if ((qt & ~ACT8) != MIXED) check_qt(qt & ~ACT8);
  return matmul_op(x, weight_of(packed, qt, N, "qlinear"), bias, "qlinear");
}

// Panels of the rows idx of a packed matrix (packed [NB, KB, PB], N rows), as `pack_q` would pack
// those rows of the file: each block's bytes of a row move from its place in its panel to the
// row's new place. The draft's head over a subset of the vocabulary: its outputs are the full
// head's at those rows, bit for bit (each output one FMA chain over K, whatever its panel).
at::Tensor pack_q_rows(const at::Tensor& packed, int64_t qt, int64_t N, const at::Tensor& idx) {
  check_qt(qt);
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == panel_block_bytes(qt) && packed.size(0) == (N + BLOCK - 1) / BLOCK,
              "pack_q_rows: packed must be pack_q's panels of N rows");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.numel() >= 1, "pack_q_rows: idx int64 [n >= 1]");
  at::Tensor ic = idx.contiguous();
  const int64_t* id = ic.data_ptr<int64_t>();
  const int64_t n = ic.numel(), KB = packed.size(1), PB = packed.size(2), NB = (n + BLOCK - 1) / BLOCK;
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(0 <= id[r] && id[r] < N, "pack_q_rows: row ", id[r], " outside [0, ", N, ")");
  // a row's bytes in a panel block: its header fields, then one byte per code row
  const int pqt = panel_qt(qt);
  const int64_t CA = codes_at(pqt), ncodes = nibbles(pqt) ? 16 : 32;
  const std::vector<HeaderField> fields = header_fields(pqt);
  at::Tensor out = at::zeros({NB, KB, PB}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t i = 0; i < BLOCK && nb * BLOCK + i < n; ++i) {
        const int64_t sb = id[nb * BLOCK + i] / BLOCK, si = id[nb * BLOCK + i] % BLOCK;
        for (int64_t kb = 0; kb < KB; ++kb) {
          const uint8_t* s = src + (sb * KB + kb) * PB;
          uint8_t* o = dst + (nb * KB + kb) * PB;
          for (const HeaderField& f : fields) std::memcpy(o + f.at + f.size * i, s + f.at + f.size * si, f.size);
          for (int64_t k = 0; k < ncodes; ++k) o[CA + k * BLOCK + i] = s[CA + k * BLOCK + si];
        }
      }
  });
  return out;
}

// Rows `idx` of the dequantized weight ([n] int64 in 0..N-1 -> [n, K] float32): the embedding
// lookup of a tied or quantized table, and the dense read-back.
template <int QT>
void qrows_impl(const uint8_t* wd, int64_t KB, const int64_t* idx, int64_t n, float* out) {
  const int64_t PB = panel_block_bytes(QT);
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t nb = idx[r] / BLOCK, i = idx[r] % BLOCK;
      float* o = out + r * KB * 32;
      for (int64_t kb = 0; kb < KB; ++kb) {
        const uint8_t* blk = wd + (nb * KB + kb) * PB;
        // the scales of `vec_scales`, one output's, by the same float32 operations
        uint16_t dh, mh = 0;
        std::memcpy(&dh, blk + 2 * i, 2);
        if (QT == QT_Q4_1 || QT == QT_Q5_1 || QT == QT_Q4_K || QT == QT_Q5_K) std::memcpy(&mh, blk + 96 + 2 * i, 2);
        const float d = _cvtsh_ss(dh);
        float d0 = d, d1 = d, m = 0.0f;
        if (QT == QT_Q4_K || QT == QT_Q5_K) {
          d0 = d1 = d * float(blk[192 + i]);
          m = 0.0f - _cvtsh_ss(mh) * float(blk[240 + i]);
        } else if (QT == QT_Q6_K) {
          d0 = d * float(int8_t(blk[96 + i]));
          d1 = d * float(int8_t(blk[144 + i]));
        } else if (QT == QT_Q4_1 || QT == QT_Q5_1) {
          m = _cvtsh_ss(mh);
        } else if (QT == QT_Q4_0) {
          m = -8.0f * d;
        }
        const uint8_t* codes = blk + codes_at(QT);
        for (int k = 0; k < 32; ++k) {
          float q;
          if (nibbles(QT)) q = float((codes[(k / 2) * BLOCK + i] >> (4 * (k % 2))) & 0xF);
          else q = float(int8_t(codes[k * BLOCK + i]));
          const float dk = k < 16 ? d0 : d1;
          o[kb * 32 + k] = mul_only(QT) ? q * dk : std::fma(q, dk, m);
        }
      }
    }
  });
}

at::Tensor qrows(const at::Tensor& packed, int64_t qt, int64_t N, const at::Tensor& idx) {
  check_qt(qt);
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == panel_block_bytes(qt), "qrows: packed [NB, K/32, PB] uint8 expected");
  at::Tensor ic = idx.to(at::kLong).contiguous();
  const int64_t n = ic.numel(), KB = packed.size(1);
  const int64_t* id = ic.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(id[r] >= 0 && id[r] < N, "qrows: index ", id[r], " out of range 0..", N - 1);
  at::Tensor out = at::empty({n, KB * 32}, packed.options().dtype(at::kFloat));
  const uint8_t* wd = packed.data_ptr<uint8_t>();
  float* od = out.data_ptr<float>();
  switch (panel_qt(qt)) {
    case QT_Q4_0: qrows_impl<QT_Q4_0>(wd, KB, id, n, od); break;
    case QT_Q4_1: qrows_impl<QT_Q4_1>(wd, KB, id, n, od); break;
    case QT_Q5_1: qrows_impl<QT_Q5_1>(wd, KB, id, n, od); break;
    case QT_Q4_K: qrows_impl<QT_Q4_K>(wd, KB, id, n, od); break;
    case QT_Q5_K: qrows_impl<QT_Q5_K>(wd, KB, id, n, od); break;
    case QT_Q6_K: qrows_impl<QT_Q6_K>(wd, KB, id, n, od); break;
    default: qrows_impl<QT_Q8_0>(wd, KB, id, n, od); break;
  }
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
  shape.push_back(KB * 32);
  return out.view(shape);
}


// ---------------------------------------------------------------------------------------------
// a decoder layer's two halves around attention, each one call (a decode step's ~90 small torch
// ops a layer cost more than its matmuls over GGUF blocks)
// ---------------------------------------------------------------------------------------------
//
// Every stage works row by row with a fixed order inside the row (norm sums in 8 lanes, then
// hsum's tree; RoPE, SiLU and the residuals elementwise), so a row's bits do not depend on the
// rows beside it, as for the matmuls and attention.

// y = (x / sqrt(mean(x^2) + eps)) * w over one row of n floats (y may be x)
inline void rms_row(const float* x, int64_t n, const float* w, float eps, float* y) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss = std::fma(x[i], x[i], ss);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = (x[i] * inv) * w[i];
}

// Rotate-half RoPE of one head row in place, then times `scale` unless it is 1:
// lo = a*c - b*s, hi = b*c + a*s (products rounded, then the sum: no FMA, like torch's ops)
inline void rope_row(float* x, int64_t Dh, const float* c, const float* sn, float scale) {
  const int64_t h = Dh / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    float lo = a * c[i] - b * sn[i], hi = b * c[i] + a * sn[i];
    if (scale != 1.0f) lo *= scale, hi *= scale;
    x[i] = lo, x[i + h] = hi;
  }
}

// out[i] = lanes(g[i], u[i]) eight at a time; the tail runs through a padded vector so every
// element takes the same instructions wherever it sits in the row
template <typename F>
inline void gated_row(const float* g, const float* u, int64_t n, float* out, const F& lanes) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, lanes(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {
    alignas(32) float gb[8] = {0}, ub[8] = {0}, ob[8];
    std::copy(g + i, g + n, gb);
    std::copy(u + i, u + n, ub);
    _mm256_store_ps(ob, lanes(_mm256_load_ps(gb), _mm256_load_ps(ub)));
    std::copy(ob, ob + (n - i), out + i);
  }
}

// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u
inline void silu_mul_row(const float* g, const float* u, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  auto lanes = [&](__m256 gv, __m256 uv) {
    const __m256 e = exp256(_mm256_xor_ps(gv, sign));
    return _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), uv);
  };
  gated_row(g, u, n, out, lanes);
}

// out[i] = gelu_tanh(g[i]) * u[i], gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
// (Gemma's gate), tanh(y) = 1 - 2 / (exp(2y) + 1) with y clamped to +-10 (tanh is 1 in float32
// there)
inline void gelu_mul_row(const float* g, const float* u, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
  const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
  const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
  auto lanes = [&](__m256 gv, __m256 uv) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(gv, gv), gv);
    __m256 y = _mm256_mul_ps(k0, _mm256_add_ps(gv, _mm256_mul_ps(k1, g3)));
    y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp256(_mm256_mul_ps(two, y)), one)));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, gv), _mm256_add_ps(one, t)), uv);
  };
  gated_row(g, u, n, out, lanes);
}

// Rows [0, M) through f(row), threaded only where there are enough rows to pay for it
template <typename F>
inline void rows_for(int64_t M, const F& f) {
  if (M < 16) {
    for (int64_t m = 0; m < M; ++m) f(m);
    return;
  }
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) f(m);
  });
}

// x [..., n] -> rms-normed rows times w [n]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: float32 expected");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.numel() == n, "rms_norm: weight of ", w.numel(), " for rows of ", n);
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xd = xc.data_ptr<float>();
  const float* wd = wc.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  rows_for(xc.numel() / n, [&](int64_t m) { rms_row(xd + m * n, n, wd, static_cast<float>(eps), yd + m * n); });
  return y;
}

template <typename T>
inline void store_as(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // c10's conversions round to nearest even
}

// The first half: norm, fused q/k/v (+ bias), q/k norms, RoPE, the queries scaled.
// x [B, T, D]; cos, sin [B, T, 1, Dh/2] -> [B, T, H + 2 KH, Dh] (q scaled, k, v). With kc/vc (a
// cache's [L, B, KH, capacity, Dh] tensors) the new k/v rows are also written at [layer, :, :, start + t].
at::Tensor attn_in(const at::Tensor& x, const at::Tensor& norm, double eps, const at::Tensor& packed, int64_t qt,
                   int64_t N, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& q_norm,
                   const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                   int64_t KH, double q_scale, const c10::optional<at::Tensor>& kc,
                   const c10::optional<at::Tensor>& vc, int64_t layer, int64_t start) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "attn_in: x float32 [B, T, D] expected");
  const Weight w = weight_of(packed, qt, N, "attn_in");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), M = B * T, NH = H + 2 * KH;
  TORCH_CHECK(D == w.K && N % NH == 0, "attn_in: weight [", N, ", ", w.K, "] does not fit x of width ", D,
              " and ", NH, " heads");
  const int64_t Dh = N / NH;
  TORCH_CHECK(Dh % 2 == 0 && cos.numel() == M * Dh / 2 && sin.numel() == M * Dh / 2 &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "attn_in: cos/sin float32 [B, T, 1, Dh/2] expected");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "attn_in: q_norm and k_norm go together");
  TORCH_CHECK(kc.has_value() == vc.has_value(), "attn_in: kc and vc go together");
  at::Tensor xc = x.contiguous(), nc, bc, qnc, knc;
  const float* nd = vec_ptr(norm, D, nc, "attn_in", "norm");
  const float* bd = vec_ptr(bias, N, bc, "attn_in", "bias");
  const float* qn = vec_ptr(q_norm, Dh, qnc, "attn_in", "q_norm");
  const float* kn = vec_ptr(k_norm, Dh, knc, "attn_in", "k_norm");
  at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  const float* cd = cc.data_ptr<float>();
  const float* sd = sc.data_ptr<float>();
  const float e = static_cast<float>(eps), qs = static_cast<float>(q_scale);
  const float* xd = xc.data_ptr<float>();

  at::Tensor h = at::empty({M, D}, x.options());
  float* hd = h.data_ptr<float>();
  rows_for(M, [&](int64_t m) { rms_row(xd + m * D, D, nd, e, hd + m * D); });
  at::Tensor out = at::empty({B, T, NH, Dh}, x.options());
  float* od = out.data_ptr<float>();
  matmul_into(w, hd, M, D, bd, nullptr, od);
  rows_for(M, [&](int64_t m) {
    const float* c = cd + m * Dh / 2;
    const float* sn = sd + m * Dh / 2;
    for (int64_t j = 0; j < H + KH; ++j) {
      float* p = od + m * N + j * Dh;
      if (qn) rms_row(p, Dh, j < H ? qn : kn, e, p);
      rope_row(p, Dh, c, sn, j < H ? qs : 1.0f);
    }
  });
  if (kc.has_value()) {
    const at::Tensor& K = *kc;
    const at::Tensor& V = *vc;
    TORCH_CHECK(K.dim() == 5 && K.sizes() == V.sizes() && K.scalar_type() == V.scalar_type() && K.size(1) == B &&
                    K.size(2) == KH && K.size(4) == Dh && layer >= 0 && layer < K.size(0) && start >= 0 &&
                    start + T <= K.size(3) && K.stride(4) == 1 && V.stride(4) == 1,
                "attn_in: cache tensors [L, B, KH, capacity, Dh] that hold rows start .. start + T expected");
    auto write = [&](auto* kd, auto* vd) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t kh = 0; kh < KH; ++kh) {
            const float* src = od + (b * T + t) * N + (H + kh) * Dh;
            const int64_t at_k = layer * K.stride(0) + b * K.stride(1) + kh * K.stride(2) + (start + t) * K.stride(3);
            const int64_t at_v = layer * V.stride(0) + b * V.stride(1) + kh * V.stride(2) + (start + t) * V.stride(3);
            store_as(src, kd + at_k, Dh);
            store_as(src + KH * Dh, vd + at_v, Dh);
          }
    };
    switch (K.scalar_type()) {
      case at::kFloat: write(K.data_ptr<float>(), V.data_ptr<float>()); break;
      case at::kBFloat16: write(K.data_ptr<c10::BFloat16>(), V.data_ptr<c10::BFloat16>()); break;
      case at::kHalf: write(K.data_ptr<c10::Half>(), V.data_ptr<c10::Half>()); break;
      default: TORCH_CHECK(false, "attn_in: cache must be float32, bfloat16 or float16");
    }
  }
  return out;
}

// attn_in, then attention of its queries over the cache's keys 0 .. start + T of `layer` (the new
// rows written by attn_in): a layer's whole first half in one call, no views made in Python.
// -> [B, T, H * Dh]
at::Tensor attn_block(const at::Tensor& x, const at::Tensor& norm, double eps, const at::Tensor& packed, int64_t qt,
                      int64_t N, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& q_norm,
                      const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                      int64_t KH, double q_scale, const at::Tensor& kc, const at::Tensor& vc, int64_t layer,
                      int64_t start, const c10::optional<at::Tensor>& mask, int64_t chunk) {
  at::Tensor qkv = attn_in(x, norm, eps, packed, qt, N, bias, q_norm, k_norm, cos, sin, H, KH, q_scale, kc, vc, layer,
                           start);
  const int64_t S = start + x.size(1);
  at::Tensor q = qkv.narrow(2, 0, H);
  at::Tensor k = kc.select(0, layer).narrow(2, 0, S), v = vc.select(0, layer).narrow(2, 0, S);
  return std::get<0>(attention(q, k, v, mask, chunk, false, c10::nullopt, c10::nullopt, c10::nullopt));
}

// The second half: x + att Wo^T + bo, then that plus the MLP of its norm:
// x1 = x + o(att); h = norm(x1); x1 + down(silu(gate(h)) * up(h)). x [B, T, D], att [B, T, H*Dh].
at::Tensor attn_out_mlp(const at::Tensor& x, const at::Tensor& att, const at::Tensor& wo, int64_t qt_o, int64_t n_o,
                        const c10::optional<at::Tensor>& bo, const at::Tensor& norm, double eps,
                        const at::Tensor& wgu, int64_t qt_gu, int64_t n_gu, const c10::optional<at::Tensor>& bgu,
                        const at::Tensor& wd, int64_t qt_d, int64_t n_d, const c10::optional<at::Tensor>& bdn,
                        const c10::optional<at::Tensor>& post_attn, const c10::optional<at::Tensor>& post_mlp,
                        bool gelu) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && att.scalar_type() == at::kFloat,
              "attn_out_mlp: float32 x [B, T, D] and att expected");
  const Weight o = weight_of(wo, qt_o, n_o, "attn_out_mlp"), gu = weight_of(wgu, qt_gu, n_gu, "attn_out_mlp"),
               dn = weight_of(wd, qt_d, n_d, "attn_out_mlp");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), M = B * T, I = gu.N / 2;
  TORCH_CHECK(o.N == D && gu.K == D && gu.N % 2 == 0 && dn.K == I && dn.N == D && att.numel() == M * o.K,
              "attn_out_mlp: weight shapes do not fit x of width ", D);
  at::Tensor xc = x.contiguous(), ac = att.contiguous(), nc, b1, b2, b3;
  const float* nd = vec_ptr(norm, D, nc, "attn_out_mlp", "norm");
  const float* bod = vec_ptr(bo, D, b1, "attn_out_mlp", "bo");
  const float* bgd = vec_ptr(bgu, gu.N, b2, "attn_out_mlp", "bgu");
  const float* bdd = vec_ptr(bdn, D, b3, "attn_out_mlp", "bd");
  at::Tensor pc1, pc2;
  const float* pad = vec_ptr(post_attn, D, pc1, "attn_out_mlp", "post_attn");
  const float* pmd = vec_ptr(post_mlp, D, pc2, "attn_out_mlp", "post_mlp");
  const float e = static_cast<float>(eps);
  const float* xd = xc.data_ptr<float>();
  // Gemma's branch ends: rows y = res + rms_norm(y, w), in place
  auto norm_then_add = [&](float* y, const float* w, const float* res) {
    rows_for(M, [&](int64_t m) {
      float* r = y + m * D;
      rms_row(r, D, w, e, r);
      for (int64_t i = 0; i < D; ++i) r[i] = res[m * D + i] + r[i];
    });
  };
  at::Tensor x1 = at::empty({M, D}, x.options());
  float* x1d = x1.data_ptr<float>();
  if (pad) {  // Gemma: x1 = x + norm(att Wo^T + bo)
    matmul_into(o, ac.data_ptr<float>(), M, o.K, bod, nullptr, x1d);
    norm_then_add(x1d, pad, xd);
  } else {
    matmul_into(o, ac.data_ptr<float>(), M, o.K, bod, xd, x1d);
  }
  at::Tensor h = at::empty({M, D}, x.options());
  float* hd = h.data_ptr<float>();
  rows_for(M, [&](int64_t m) { rms_row(x1d + m * D, D, nd, e, hd + m * D); });
  at::Tensor g = at::empty({M, gu.N}, x.options());
  float* gd = g.data_ptr<float>();
  matmul_into(gu, hd, M, D, bgd, nullptr, gd);
  at::Tensor a = at::empty({M, I}, x.options());
  float* ad = a.data_ptr<float>();
  rows_for(M, [&](int64_t m) {
    if (gelu) gelu_mul_row(gd + m * gu.N, gd + m * gu.N + I, I, ad + m * I);
    else silu_mul_row(gd + m * gu.N, gd + m * gu.N + I, I, ad + m * I);
  });
  at::Tensor out = at::empty({B, T, D}, x.options());
  float* od = out.data_ptr<float>();
  if (pmd) {  // Gemma: out = x1 + norm(down(...) + bd)
    matmul_into(dn, ad, M, I, bdd, nullptr, od);
    norm_then_add(od, pmd, x1d);
  } else {
    matmul_into(dn, ad, M, I, bdd, x1d, od);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(TS_NS, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, int chunk, bool want_lse, Tensor? k_scale=None, "
        "Tensor? v_scale=None, Tensor? kv_start=None) -> (Tensor, Tensor)");
  m.def("attention_rows(Tensor q, Tensor k, Tensor v, Tensor rows, int chunk) -> Tensor");
  m.def("sparse_select_dims(Tensor q, Tensor kt, Tensor ks, int a, int b, int S, int budget, int dims) -> Tensor");
  m.def("quantize_q8(Tensor x, Tensor(a!) q, Tensor(b!) scale) -> ()");
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("pack_q(Tensor raw, int qtype, int k) -> Tensor");
  m.def("qlinear(Tensor x, Tensor packed, int qtype, int n, Tensor? bias) -> Tensor");
  m.def("qrows(Tensor packed, int qtype, int n, Tensor idx) -> Tensor");
  m.def("pack_q_rows(Tensor packed, int qtype, int n, Tensor idx) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("attn_in(Tensor x, Tensor norm, float eps, Tensor w, int qtype, int n, Tensor? bias, Tensor? q_norm, "
        "Tensor? k_norm, Tensor cos, Tensor sin, int heads, int kv_heads, float q_scale, Tensor(a!)? kc, "
        "Tensor(b!)? vc, int layer, int start) -> Tensor");
  m.def("attn_block(Tensor x, Tensor norm, float eps, Tensor w, int qtype, int n, Tensor? bias, Tensor? q_norm, "
        "Tensor? k_norm, Tensor cos, Tensor sin, int heads, int kv_heads, float q_scale, Tensor(a!) kc, "
        "Tensor(b!) vc, int layer, int start, Tensor? mask, int chunk) -> Tensor");
  m.def("attn_out_mlp(Tensor x, Tensor att, Tensor wo, int qt_o, int n_o, Tensor? bo, Tensor norm, float eps, "
        "Tensor wgu, int qt_gu, int n_gu, Tensor? bgu, Tensor wd, int qt_d, int n_d, Tensor? bd, "
        "Tensor? post_attn=None, Tensor? post_mlp=None, bool gelu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(TS_NS, CPU, m) {
  m.impl("attention", &attention);
  m.impl("attention_rows", &attention_rows);
  m.impl("sparse_select_dims", &sparse_select_dims);
  m.impl("quantize_q8", &quantize_q8);
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
  m.impl("pack_q", &pack_q);
  m.impl("qlinear", &qlinear);
  m.impl("qrows", &qrows);
  m.impl("pack_q_rows", &pack_q_rows);
  m.impl("rms_norm", &rms_norm);
  m.impl("attn_in", &attn_in);
  m.impl("attn_block", &attn_block);
  m.impl("attn_out_mlp", &attn_out_mlp);
}
