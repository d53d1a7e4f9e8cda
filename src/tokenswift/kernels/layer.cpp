// A decoder layer's two halves around attention, one call each (one family of the native CPU
// kernels; common.h holds what they share), and the ops' schema (TORCH_LIBRARY: the other
// sources add theirs as fragments).

#include "common.h"

namespace TS_NS {

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
                      int64_t start, const c10::optional<at::Tensor>& mask, int64_t chunk, bool bf16,
                      bool bf16_amx) {
  at::Tensor qkv = attn_in(x, norm, eps, packed, qt, N, bias, q_norm, k_norm, cos, sin, H, KH, q_scale, kc, vc, layer,
                           start);
  const int64_t S = start + x.size(1);
  at::Tensor q = qkv.narrow(2, 0, H);
  at::Tensor k = kc.select(0, layer).narrow(2, 0, S), v = vc.select(0, layer).narrow(2, 0, S);
  return std::get<0>(attention(q, k, v, mask, chunk, false, c10::nullopt, c10::nullopt, c10::nullopt, bf16, bf16_amx));
}

// attn_in for one token, then the sparse draft's attention (`SparseKV` with the dims scorer): its
// query chooses the rows of the layer's keys 0 .. start + 1 (`sparse_select_dims` over the copy
// kt/ks: entries [0, a), the top `budget` of [a, b), [b, start + 1)) and attends to them
// (`attention_rows`): the three calls of the unfused path in one, the same numbers. -> [1, 1, H * Dh]
at::Tensor attn_block_sparse(const at::Tensor& x, const at::Tensor& norm, double eps, const at::Tensor& packed,
                             int64_t qt, int64_t N, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                             const at::Tensor& cos, const at::Tensor& sin, int64_t H, int64_t KH, double q_scale,
                             const at::Tensor& kc, const at::Tensor& vc, int64_t layer, int64_t start,
                             const at::Tensor& kt, const at::Tensor& ks, int64_t a, int64_t b, int64_t budget,
                             int64_t dims, int64_t chunk) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1, "attn_block_sparse: one token, x [1, 1, D]");
  at::Tensor qkv = attn_in(x, norm, eps, packed, qt, N, bias, q_norm, k_norm, cos, sin, H, KH, q_scale, kc, vc, layer,
                           start);
  at::Tensor q = qkv.narrow(2, 0, H);
  at::Tensor rows = sparse_select_dims(q, kt, ks, a, b, start + 1, budget, dims);
  return attention_rows(q, kc.select(0, layer), vc.select(0, layer), rows, chunk);
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

}  // namespace TS_NS

TORCH_LIBRARY(TS_NS, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("attn_in(Tensor x, Tensor norm, float eps, Tensor w, int qtype, int n, Tensor? bias, Tensor? q_norm, "
        "Tensor? k_norm, Tensor cos, Tensor sin, int heads, int kv_heads, float q_scale, Tensor(a!)? kc, "
        "Tensor(b!)? vc, int layer, int start) -> Tensor");
  m.def("attn_block(Tensor x, Tensor norm, float eps, Tensor w, int qtype, int n, Tensor? bias, Tensor? q_norm, "
        "Tensor? k_norm, Tensor cos, Tensor sin, int heads, int kv_heads, float q_scale, Tensor(a!) kc, "
        "Tensor(b!) vc, int layer, int start, Tensor? mask, int chunk, bool bf16=False, bool bf16_amx=False) -> Tensor");
  m.def("attn_block_sparse(Tensor x, Tensor norm, float eps, Tensor w, int qtype, int n, Tensor? bias, "
        "Tensor? q_norm, Tensor? k_norm, Tensor cos, Tensor sin, int heads, int kv_heads, float q_scale, "
        "Tensor(a!) kc, Tensor(b!) vc, int layer, int start, Tensor kt, Tensor ks, int a, int b, int budget, "
        "int dims, int chunk) -> Tensor");
  m.def("attn_out_mlp(Tensor x, Tensor att, Tensor wo, int qt_o, int n_o, Tensor? bo, Tensor norm, float eps, "
        "Tensor wgu, int qt_gu, int n_gu, Tensor? bgu, Tensor wd, int qt_d, int n_d, Tensor? bd, "
        "Tensor? post_attn=None, Tensor? post_mlp=None, bool gelu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(TS_NS, CPU, m) {
  m.impl("rms_norm", &TS_NS::rms_norm);
  m.impl("attn_in", &TS_NS::attn_in);
  m.impl("attn_block", &TS_NS::attn_block);
  m.impl("attn_block_sparse", &TS_NS::attn_block_sparse);
  m.impl("attn_out_mlp", &TS_NS::attn_out_mlp);
}
