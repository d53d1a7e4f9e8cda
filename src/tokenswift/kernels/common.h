// The kernels' shared header: vector helpers, the packed weight form, and what one kernel family
// calls of another. Each instruction level builds every source with its own flags and its own
// TS_NS (kernels/__init__.py): the ops' namespace, and the C++ namespace of everything here, so
// that two levels' libraries can be loaded side by side.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef TS_NS
#define TS_NS tokenswift
#endif

namespace TS_NS {

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

#if defined(__AVX512F__)
// exp256's operations on 16 lanes: each lane gets exp256's bits.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __m512 hi = _mm512_set1_ps(88.3f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~under), p, _mm512_castsi512_ps(e));
}
#endif

// x[i] = exp(x[i] - m) in place for i < n rounded down to 8 (exp256's bits per element, 16 a
// vector where the build has AVX-512) -> the 8 lanes' sums of those exps, each lane's additions in
// index order (a 16-wide vector's two halves added one after the other): the same sums at either
// width. The softmax of attention's chunks and of the sparse draft's choice.
inline __m256 exp_shift_sum8(float* x, int64_t n, float m) {
  __m256 lv = _mm256_setzero_ps();
  int64_t i = 0;
#if defined(__AVX512F__)
  for (const __m512 mw = _mm512_set1_ps(m); i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mw));
    _mm512_storeu_ps(x + i, e);
    lv = _mm256_add_ps(lv, _mm512_castps512_ps256(e));
    lv = _mm256_add_ps(lv, _mm512_extractf32x8_ps(e, 1));
  }
#endif
  for (const __m256 mv = _mm256_set1_ps(m); i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    lv = _mm256_add_ps(lv, e);
  }
  return lv;
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

// f(std::integral_constant<int, R>) for R = rows (1 .. MAX, at most MAX): a row count as a
// template argument, so that per-row accumulators stay in registers
template <int MAX, int N = 1, typename F>
inline void with_rows(int64_t rows, const F& f) {
  if constexpr (N < MAX) {
    if (rows == N) return f(std::integral_constant<int, N>{});
    with_rows<MAX, N + 1>(rows, f);
  } else {
    f(std::integral_constant<int, N>{});
  }
}

// MXCSR's flush-to-zero and denormals-are-zero for this scope (this thread), as AMX's bfloat16
// products run: a denormal input reads as zero and a denormal result becomes zero.
struct FlushDenormals {
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

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

#if defined(__AVX512F__)
// The same widening, sixteen elements at a time (the same values).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

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

// ---------------------------------------------------------------------------------------------
// shared between the families
// ---------------------------------------------------------------------------------------------

constexpr int64_t BLOCK = 48;  // outputs per packed panel: 6 vectors of 8, or 3 of 16

// A packed weight matrix as the kernels take it: float32 panels (qt 0), GGUF blocks (qt: ggml's
// id) or a stack of block matrices of different types (qt MIXED: `parts`, rows one after another).
struct Weight {
  int64_t qt = 0, N = 0, K = 0, NB = 0;
  bool act8 = false;  // int8 activations (qt | ACT8 from Python)
  const float* f = nullptr;
  const uint8_t* q = nullptr;
  std::vector<Weight> parts;
};

// the packed weight behind an op's arguments (linear.cpp)
Weight weight_of(const at::Tensor& packed, int64_t qt, int64_t N, const char* op);
// y [M, N] = x [M, K] (row stride ldx) W^T + b, plus the residual rows rd [M, N] when given;
// y's rows of stride ldy (0: N) (linear.cpp)
void matmul_into(const Weight& w, const float* xd, int64_t M, int64_t ldx, const float* bd, const float* rd,
                 float* yd, int64_t ldy = 0);
// the attention op (attention.cpp)
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const c10::optional<at::Tensor>& mask, int64_t chunk, bool want_lse,
                                             const c10::optional<at::Tensor>& k_scale,
                                             const c10::optional<at::Tensor>& v_scale,
                                             const c10::optional<at::Tensor>& kv_start, bool bf16,
                                             bool bf16_amx);
// the sparse draft's choice of rows and its attention over them (attention.cpp)
at::Tensor sparse_select_dims(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& ks, int64_t a, int64_t b,
                              int64_t S, int64_t budget, int64_t dims);
at::Tensor attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                          int64_t chunk);

}  // namespace TS_NS
