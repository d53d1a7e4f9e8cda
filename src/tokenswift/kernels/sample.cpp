// The sampler's hot path, one row at a time: repetition penalty, temperature, top-k, min-p with
// min_keep, then the position-keyed Gumbel-max draw over the kept tokens (sampling.py's
// `draw(final_scores(...))`, whose arithmetic this repeats: float32 scores, the min-p test and
// score + noise in float64, the first of equal maxima). Torch's version of it makes a dozen
// passes over the vocabulary and ~2 MB of noise a row; this one makes four passes and draws the
// noise of the kept tokens only (a few dozen under min-p), which at Gemma 3's 262,144 tokens is
// most of a millisecond a token. Top-p and eta stay in torch (sampling.py falls back for them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// The k-th largest of x[0, n) (k >= 1, counting equal values), as torch.topk(x, k)[-1].
float kth_largest(const float* x, int64_t n, int64_t k) {
  if (k <= 64) {  // one pass with a min-heap of the k best so far
    std::priority_queue<float, std::vector<float>, std::greater<float>> heap;
    for (int64_t i = 0; i < n; ++i) {
      if (static_cast<int64_t>(heap.size()) < k) heap.push(x[i]);
      else if (x[i] > heap.top()) {
        heap.pop();
        heap.push(x[i]);
      }
    }
    return heap.top();
  }
  std::vector<float> c(x, x + n);
  std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), std::greater<float>());
  return c[k - 1];
}

int64_t sample_row(const float* logits, int64_t V, const int64_t* win, int64_t W, uint64_t key, double penalty,
                   double temperature, int64_t top_k, double ln_min_p, bool use_min_p, int64_t min_keep,
                   bool greedy, std::vector<float>& x) {
  x.assign(logits, logits + V);
  if (penalty != 1.0 && W > 0) {  // each distinct token of the window once, from its logit
    const float p = static_cast<float>(penalty);
    for (int64_t j = 0; j < W; ++j) {
      const int64_t t = win[j];
      const float l = logits[t];
      x[t] = l > 0 ? l / p : l * p;
    }
  }
  if (greedy) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (x[i] > x[best]) best = i;
    return best;
  }
  if (temperature != 1.0) {
    const float t = static_cast<float>(temperature);
    for (int64_t i = 0; i < V; ++i) x[i] = x[i] / t;
  }
  const int64_t keep_n = std::min(min_keep, V);
  if (top_k > 0 && top_k < V) {
    const float kth = kth_largest(x.data(), V, std::max(top_k, keep_n));
    for (int64_t i = 0; i < V; ++i)
      if (x[i] < kth) x[i] = kNegInf;
  }
  if (use_min_p) {
    float xmax = kNegInf;
    for (int64_t i = 0; i < V; ++i) xmax = std::max(xmax, x[i]);
    const float kth = keep_n > 1 ? kth_largest(x.data(), V, keep_n) : 0.0f;
    const double m = static_cast<double>(xmax);
    for (int64_t i = 0; i < V; ++i) {
      const bool drop = static_cast<double>(x[i]) - m < ln_min_p;
      if (drop && (keep_n <= 1 || x[i] < kth)) x[i] = kNegInf;
    }
  }
  int64_t best = -1;
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    if (!(x[i] > kNegInf)) continue;
    const double s = static_cast<double>(x[i]) + gumbel_noise(key, i);
    if (best < 0 || s > top) {
      top = s;
      best = i;
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
    std::vector<float> x;
    for (int64_t r = begin; r < end; ++r)
      od[r] = sample_row(ld + r * V, V, wd ? wd + (wrows == 1 ? 0 : r) * W : nullptr, W,
                         static_cast<uint64_t>(kd[r]), penalty, temperature, top_k, ln_min_p, use_min_p, min_keep,
                         greedy, x);
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

TORCH_LIBRARY_FRAGMENT(tokenswift, m) {
  m.def("sample_rows(Tensor logits, Tensor? window, Tensor keys, float penalty, float temperature, int top_k, "
        "float ln_min_p, bool use_min_p, int min_keep, bool greedy) -> Tensor");
  m.def("gumbel_at(int key, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenswift, CPU, m) {
  m.impl("sample_rows", &sample_rows);
  m.impl("gumbel_at", &gumbel_at);
}
