// The sampler's hot path, one row at a time: repetition penalty, temperature, top-k, min-p with
// min_keep, then the position-keyed Gumbel-max draw over the kept tokens (sampling.py's
// `draw(final_scores(...))`, whose arithmetic this repeats: float32 scores, the min-p test and
// score + noise in float64, the first of equal maxima). Torch's version makes a dozen passes
// over the vocabulary; here the filters reduce to one float floor (a kept score is >= it, found
// from the max and the k-th largest scores), the vocabulary is read a few times by vector
// compares, and only the kept few (a few dozen under min-p) are visited after, their noise
// drawn alone. Top-p and eta stay in torch (sampling.py falls back for them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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
#include <functional>
#include <limits>
#include <queue>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Token `id`'s Gumbel noise at the position keyed `key`: the id-th output of SplitMix64 seeded
// with the key, its top 53 bits + 1/2 over 2^53 in (0, 1), then -log(-log(u)).
inline double gumbel_noise(uint64_t key, int64_t id) {
  const uint64_t z = mix64(key + static_cast<uint64_t>(id + 1) * 0x9E3779B97F4A7C15ULL);
  const double u = (static_cast<double>(z >> 11) + 0.5) * 0x1.0p-53;
  return -std::log(-std::log(u));
}

// max of x[0, n) (-inf when n == 0; NaNs are not produced by the filters and are skipped).
float max_of(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float b[8];
  _mm256_store_ps(b, m);
  float r = kNegInf;
  for (float v : b) r = std::max(r, v);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// The k-th largest of x[0, n) (1 <= k <= n, counting equal values), as torch.topk(x, k)[-1].
float kth_largest(const float* x, int64_t n, int64_t k) {
  if (k <= 64) {  // a min-heap of the k best so far; blocks of 8 with nothing above its top are skipped
    std::priority_queue<float, std::vector<float>, std::greater<float>> heap;
    int64_t i = 0;
    for (; i < n && static_cast<int64_t>(heap.size()) < k; ++i) heap.push(x[i]);
    auto take = [&](float v) {
      if (v > heap.top()) {
        heap.pop();
        heap.push(v);
      }
    };
    for (; i < n && i % 8; ++i) take(x[i]);
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      if (_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(heap.top()), _CMP_GT_OQ)))
        for (int64_t j = i; j < i + 8; ++j) take(x[j]);
    }
    for (; i < n; ++i) take(x[i]);
    return heap.top();
  }
  std::vector<float> c(x, x + n);
  std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), std::greater<float>());
  return c[k - 1];
}

// The smallest float f with (double)f - m >= L: min-p keeps exactly the scores >= it (the test
// is monotone in f), so that the pass over the vocabulary is one float compare.
float min_p_floor(double m, double L) {
  auto keeps = [&](float f) { return static_cast<double>(f) - m >= L; };
  float f = static_cast<float>(m + L);
  while (!keeps(f)) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  for (float g = std::nextafter(f, kNegInf); keeps(g); g = std::nextafter(f, kNegInf)) f = g;
  return f;
}

int64_t sample_row(const float* logits, int64_t V, const int64_t* win, int64_t W, uint64_t key, double penalty,
                   double temperature, int64_t top_k, double ln_min_p, bool use_min_p, int64_t min_keep,
                   bool greedy, std::vector<float>& x, std::vector<int64_t>& cand) {
  x.resize(V);  // reused across calls (a fresh 1 MB a row cost its page faults)
  std::memcpy(x.data(), logits, V * sizeof(float));
  if (penalty != 1.0 && W > 0) {  // each distinct token of the window once, from its logit
    const float p = static_cast<float>(penalty);
    for (int64_t j = 0; j < W; ++j) {
      const int64_t t = win[j];
      const float l = logits[t];
      x[t] = l > 0 ? l / p : l * p;
    }
  }
  float* xd = x.data();
  const float xmax = max_of(xd, V);
  if (greedy) {  // the first maximum
    const __m256 mv = _mm256_set1_ps(xmax);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8)
      if (const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xd + i), mv, _CMP_EQ_OQ))) return i + __builtin_ctz(m);
    for (; i < V; ++i)
      if (xd[i] == xmax) return i;
    return 0;
  }
  float hi = xmax;
  if (temperature != 1.0) {
    const float t = static_cast<float>(temperature);
    const __m256 tv = _mm256_set1_ps(t);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) _mm256_storeu_ps(xd + i, _mm256_div_ps(_mm256_loadu_ps(xd + i), tv));
    for (; i < V; ++i) xd[i] = xd[i] / t;
    hi = max_of(xd, V);
  }
  // a score is kept when it is >= floor (and finite): top-k's k-th largest, and min-p's floor
  // lowered to the min_keep-th largest where that is lower
  const int64_t keep_n = std::min(min_keep, V);
  float floor = kNegInf;
  if (top_k > 0 && top_k < V) floor = kth_largest(xd, V, std::max(top_k, keep_n));
  if (use_min_p && hi > kNegInf) {
    float f = min_p_floor(static_cast<double>(hi), ln_min_p);
    if (keep_n > 1) f = std::min(f, kth_largest(xd, V, keep_n));
    floor = std::max(floor, f);
  }
  cand.clear();
  const __m256 fv = _mm256_set1_ps(floor), ninf = _mm256_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(xd + i);
    int mask = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, fv, _CMP_GE_OQ), _mm256_cmp_ps(v, ninf, _CMP_GT_OQ)));
    while (mask) {
      const int b = __builtin_ctz(mask);
      cand.push_back(i + b);
      mask &= mask - 1;
    }
  }
  for (; i < V; ++i)
    if (xd[i] >= floor && xd[i] > kNegInf) cand.push_back(i);
  int64_t best = -1;
  double top = -std::numeric_limits<double>::infinity();
  for (const int64_t c : cand) {
    const double s = static_cast<double>(xd[c]) + gumbel_noise(key, c);
    if (best < 0 || s > top) {
      top = s;
      best = c;
    }
  }
  return best < 0 ? 0 : best;
}

at::Tensor sample_rows(const at::Tensor& logits, const c10::optional<at::Tensor>& window, const at::Tensor& keys,
                       double penalty, double temperature, int64_t top_k, double ln_min_p, bool use_min_p,
                       int64_t min_keep, bool greedy) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "sample_rows: logits must be float32 [N, V]");
  TORCH_CHECK(keys.dim() == 1 && keys.size(0) == logits.size(0) && keys.scalar_type() == at::kLong,
              "sample_rows: keys must be int64 [N]");
  const at::Tensor l = logits.contiguous(), k = keys.contiguous();
  const int64_t N = l.size(0), V = l.size(1);
  at::Tensor w;
  int64_t W = 0;
  if (window.has_value() && window->numel() > 0) {
    w = window->to(at::kLong).contiguous();
    TORCH_CHECK(w.dim() == 2 && (w.size(0) == N || w.size(0) == 1), "sample_rows: window must be [N or 1, W]");
    W = w.size(1);
    TORCH_CHECK(w.min().item<int64_t>() >= 0 && w.max().item<int64_t>() < V, "sample_rows: window ids outside [0, ",
                V, ")");
  }
  at::Tensor out = at::empty({N}, keys.options());
  const float* ld = l.data_ptr<float>();
  const int64_t* wd = W ? w.data_ptr<int64_t>() : nullptr;
  const int64_t wrows = W ? w.size(0) : 0;
  const int64_t* kd = k.data_ptr<int64_t>();
  int64_t* od = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<float> x;
    static thread_local std::vector<int64_t> cand;
    for (int64_t r = begin; r < end; ++r)
      od[r] = sample_row(ld + r * V, V, wd ? wd + (wrows == 1 ? 0 : r) * W : nullptr, W,
                         static_cast<uint64_t>(kd[r]), penalty, temperature, top_k, ln_min_p, use_min_p, min_keep,
                         greedy, x, cand);
  });
  return out;
}

at::Tensor gumbel_at(int64_t key, const at::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "gumbel_at: ids must be int64");
  const at::Tensor i = ids.contiguous();
  at::Tensor out = at::empty(i.sizes(), i.options().dtype(at::kDouble));
  const int64_t* id = i.data_ptr<int64_t>();
  double* od = out.data_ptr<double>();
  const uint64_t k = static_cast<uint64_t>(key);
  at::parallel_for(0, i.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) od[j] = gumbel_noise(k, id[j]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TS_NS, m) {
  m.def("sample_rows(Tensor logits, Tensor? window, Tensor keys, float penalty, float temperature, int top_k, "
        "float ln_min_p, bool use_min_p, int min_keep, bool greedy) -> Tensor");
  m.def("gumbel_at(int key, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(TS_NS, CPU, m) {
  m.impl("sample_rows", &sample_rows);
  m.impl("gumbel_at", &gumbel_at);
}
