// Matmul kernels (one family of the native CPU kernels; common.h holds what they share).
//
// linear: y = x W^T + b against weights packed into panels of 48 outputs ([N/48][K][48]); every
//   output is one FMA chain over k = 0..K-1, whatever the tile of rows it is computed in.
// qlinear: the same product against GGUF blocks kept at about their size, each code dequantized
//   in registers to exactly the float32 weight the file's reference dequantization gives, so that
//   it equals `linear` on the dequantized matrix bit for bit; or, with int8 activations, exact
//   integer block sums (llama.cpp's arithmetic, a different model).
// Row invariance is what makes speculative decoding give plain decoding's tokens: a row's result
// is computed by the same instructions in the same order whatever the number of rows in the call.

#include "common.h"
#include "amx.h"

namespace TS_NS {

// ---------------------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------------------


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
  with_rows<TILE_ROWS>(rows, [&](auto RR) {
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
//
// Panels multiplied by int8 activations (qt | ACT8) keep the same headers and sizes, but their
// codes lie in the order the integer products read them (`put_codes`): per input quad t (inputs
// 4t..4t+3) a row of 192 bytes, and in it per group g of 16 outputs 64 bytes with output o's four
// codes at 4o..4o+3, which is vpdpbusd's operand and row t of an AMX tile (stride 192) as they
// stand. Nibble types hold quads 2u (low nibbles) and 2u+1 (high) in one such row. Signed codes stay signed (the VNNI and AMX
// paths offset them as they load them; AVX2's maddubs takes their signs). The codes are laid
// out once (`pack_q` with ACT8, or `relayout_q` when a loaded model turns int8 activations on),
// so the products unpack nothing but nibbles.

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
constexpr int64_t ACT8 = 256;  // added to a type id: int8 activations, and the codes in their order
// In the int8-activation order a row of codes is one quad (a nibble type's: two) of all 48 outputs,
// group g's 64 bytes at 64g: a block's codes are read front to back, whichever rows a pass takes.
constexpr int QROW = 192;

// Output i's (0..47) 32 codes of a panel block (codes: the block's codes from their start), in
// the float order or the int8 one. An output's bytes are its own in both orders (a nibble byte
// holds two codes of one output), so each is written whole. Float order: code row k (a byte
// each), or byte j holding inputs 2j (low nibble) and 2j + 1. Int8 order: in row t (QROW bytes),
// output i's four bytes at `quad_at(i)` hold inputs 4t..4t+3; a nibble type's row u holds quad
// 2u in the low nibbles and 2u + 1 in the high.
inline int quad_at(int i) { return (i / 16) * 64 + (i % 16) * 4; }
inline void get_codes(const uint8_t* codes, bool nib, bool act8, int i, uint8_t* q) {
  if (act8) {
    const uint8_t* c = codes + quad_at(i);
    if (!nib) {
      for (int t = 0; t < 8; ++t) std::memcpy(q + 4 * t, c + t * QROW, 4);
      return;
    }
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < 4; ++j) {
        const uint8_t v = c[u * QROW + j];
        q[8 * u + j] = v & 0xF, q[8 * u + 4 + j] = v >> 4;
      }
  } else if (nib) {
    for (int j = 0; j < 16; ++j) {
      const uint8_t v = codes[j * BLOCK + i];
      q[2 * j] = v & 0xF, q[2 * j + 1] = v >> 4;
    }
  } else {
    for (int k = 0; k < 32; ++k) q[k] = codes[k * BLOCK + i];
  }
}
inline void put_codes(uint8_t* codes, bool nib, bool act8, int i, const uint8_t* q) {
  if (act8) {
    uint8_t* c = codes + quad_at(i);
    if (!nib) {
      for (int t = 0; t < 8; ++t) std::memcpy(c + t * QROW, q + 4 * t, 4);
      return;
    }
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < 4; ++j) c[u * QROW + j] = uint8_t((q[8 * u + j] & 0xF) | (q[8 * u + 4 + j] << 4));
  } else if (nib) {
    for (int j = 0; j < 16; ++j) codes[j * BLOCK + i] = uint8_t((q[2 * j] & 0xF) | (q[2 * j + 1] << 4));
  } else {
    for (int k = 0; k < 32; ++k) codes[k * BLOCK + i] = q[k];
  }
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

// f(std::integral_constant<int, P>) for a panel type P (`panel_qt`): the kernels' type as a
// template argument
template <typename F>
inline void with_qt(int pqt, const F& f) {
  switch (pqt) {
    case QT_Q4_0: return f(std::integral_constant<int, QT_Q4_0>{});
    case QT_Q4_1: return f(std::integral_constant<int, QT_Q4_1>{});
    case QT_Q5_1: return f(std::integral_constant<int, QT_Q5_1>{});
    case QT_Q4_K: return f(std::integral_constant<int, QT_Q4_K>{});
    case QT_Q5_K: return f(std::integral_constant<int, QT_Q5_K>{});
    case QT_Q6_K: return f(std::integral_constant<int, QT_Q6_K>{});
    default: return f(std::integral_constant<int, QT_Q8_0>{});
  }
}

// raw [N, file row bytes] uint8 (a GGUF tensor's rows) -> [ceil(N/48), K/32, PB] uint8, the codes
// in the int8-activation order where qt has ACT8
at::Tensor pack_q(const at::Tensor& raw, int64_t qt_arg, int64_t K) {
  const bool act8 = (qt_arg & ACT8) != 0;
  const int64_t qt = qt_arg & ~ACT8;
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
          put_codes(codes, nibbles(pqt), act8, static_cast<int>(i), blk.q);
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
          with_rows<TILE_ROWS>(rows, [&](auto RR) {
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
// Lanes (the codes in the int8-activation order, `put_codes`): each 32-bit lane one output, its four
// bytes the codes of inputs 4t..4t+3, against the row's four codes (qx_4t .. qx_4t+3) broadcast.
// AVX2: maddubs sums each output's two pairs of products into two int16 lanes (32 products an
// instruction), a few quads are summed in int16 as far as they cannot overflow, and madd by ones
// widens each output's pairs into its int32 lane. AVX-512 VNNI: vpdpbusd adds the four products
// into the lane (64 an instruction).

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
// R (1 to 4) rows x the panel's 48 outputs over every block -> y[r * 48 ...] (which accumulates:
// one load, FMAs and a store per block and 8 outputs). xb: each row's quads of codes (inputs
// 4t..4t+3) broadcast to a vector, [M][K/4]. Per 8 outputs (a group's half: 32 bytes of a row of
// codes, four codes an output) and quad t, maddubs gives each output's two pairs of products as
// int16, summed over a few quads, then madd by ones widens each output's pairs into its int32
// lane. The groups are taken block by block, so a panel is read in order.
template <int QT, int R>
inline void qtile_i8(const __m256i* xb, int64_t K, const float* dx, const int32_t* sx, const uint8_t* wb, int64_t KB,
                     float* y) {
  const int64_t PB = panel_block_bytes(QT);
  // quads summed in int16 before widening, |maddubs lane| <= 2 * max|code| * 127: 4 of nibbles,
  // Q5's or Q6_K's codes (4 * 2 * 32 * 127), 1 of Q8_0's (2 * 128 * 127)
  constexpr int GP = QT == QT_Q8_0 ? 1 : 4;
  for (int r = 0; r < R; ++r) std::fill(y + r * BLOCK, y + r * BLOCK + BLOCK, 0.0f);
  const __m256i ones = _mm256_set1_epi16(1), lo4 = _mm256_set1_epi8(0x0F);
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* blk = wb + kb * PB;
    const __m256i* xk = xb + kb * 8;
    for (int v = 0; v < 6; ++v) {  // outputs 8v..8v+7: group v / 2, half v % 2
      const uint8_t* codes = blk + codes_at(QT) + (v / 2) * 64 + (v % 2) * 32;
      __m256 dw, dw1, mw;
      act8_scales<QT, V8>(blk, 8 * v, dw, dw1, mw);
      __m256i s32[R];
      for (int r = 0; r < R; ++r) s32[r] = _mm256_setzero_si256();
      for (int t0 = 0; t0 < 8; t0 += GP) {
        __m256i s16[R];
        for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
        for (int t = t0; t < t0 + GP; ++t) {
          __m256i w;
          if constexpr (nibbles(QT)) {
            w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (t / 2) * QROW));
            if (t % 2) w = _mm256_srli_epi16(w, 4);
            w = _mm256_and_si256(w, lo4);
          } else {
            w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + t * QROW));
          }
          if constexpr (signed_codes(QT)) {  // |w| times x with w's sign: maddubs takes unsigned first
            const __m256i wa = _mm256_sign_epi8(w, w);
            for (int r = 0; r < R; ++r)
              s16[r] = _mm256_add_epi16(
                  s16[r], _mm256_maddubs_epi16(wa, _mm256_sign_epi8(_mm256_load_si256(xk + r * (K / 4) + t), w)));
          } else {
            for (int r = 0; r < R; ++r)
              s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(w, _mm256_load_si256(xk + r * (K / 4) + t)));
          }
        }
        for (int r = 0; r < R; ++r) s32[r] = _mm256_add_epi32(s32[r], _mm256_madd_epi16(s16[r], ones));
        if constexpr (two_scales(QT)) {  // Q6_K: inputs 0-15 with their scale, then 16-31 with theirs
          for (int r = 0; r < R; ++r) {
            float* yr = y + r * BLOCK + 8 * v;
            const __m256 d = _mm256_mul_ps(t0 == 0 ? dw : dw1, _mm256_set1_ps(dx[r * KB + kb]));
            _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r]), d, _mm256_loadu_ps(yr)));
            s32[r] = _mm256_setzero_si256();
          }
        }
      }
      if constexpr (!two_scales(QT)) {
        for (int r = 0; r < R; ++r) {
          float* yr = y + r * BLOCK + 8 * v;
          const float dxr = dx[r * KB + kb];
          __m256i is = s32[r];
          if (QT == QT_Q4_0) is = _mm256_sub_epi32(is, _mm256_set1_epi32(8 * sx[r * KB + kb]));
          __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(dw, _mm256_set1_ps(dxr)), _mm256_loadu_ps(yr));
          if constexpr (has_min(QT)) a = _mm256_fmadd_ps(mw, _mm256_set1_ps(dxr * static_cast<float>(sx[r * KB + kb])), a);
          _mm256_storeu_ps(yr, a);
        }
      }
    }
  }
}
#endif

#if defined(__AVX512VNNI__)
// The same integer block sums by VNNI (the AVX-512 build): each 32-bit lane is one output, its
// four bytes the codes of inputs 4t..4t+3, against the row's four int8 codes broadcast, and
// vpdpbusd adds the four products into the lane: 64 products an instruction. Its first operand
// is unsigned, so signed codes enter as q + 128 (q xor 0x80) and 128 * sum(qx) is taken back;
// the other types' codes are unsigned already. The sums are the same integers as `qtile_i8`'s
// and the float epilogue is its, lane for lane: the same bits.

// The unsigned codes of inputs 4t..4t+3 (t = 0..7) of a group's 16 outputs (gcodes: the group's
// codes in the int8-activation order), four bytes a lane: vpdpbusd's first operand, and row t of
// an AMX tile of the block. Nibbles are masked out of their byte; signed codes are offset by 128
// (q xor 0x80).
template <int QT>
inline __m512i vnni_codes(const uint8_t* gcodes, int t) {
  if constexpr (nibbles(QT)) {
    __m512i v = _mm512_loadu_si512(gcodes + (t / 2) * QROW);
    if (t % 2) v = _mm512_srli_epi16(v, 4);
    return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  } else {
    const __m512i w = _mm512_loadu_si512(gcodes + t * QROW);
    if constexpr (signed_codes(QT)) return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
    return w;
  }
}

// acc + float(s - off) * (d * dxr): a block sum's term, the offset off taken back as an integer
inline __m512 act8_term(__m512i s, int32_t off, __m512 d, float dxr, __m512 acc) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, _mm512_set1_epi32(off))), _mm512_mul_ps(d, _mm512_set1_ps(dxr)),
                         acc);
}

// A row's block sum s of 16 outputs for a type with one scale, as vnni_codes' unsigned codes make
// it, into acc: the offsets taken back (128 per signed code, Q4_0's 8), then dw and the offset mw
// (`act8_scales`); dxr, sr the row's block scale and code sum.
template <int QT>
inline __m512 act8_one(__m512i s, __m512 dw, __m512 mw, float dxr, int32_t sr, __m512 acc) {
  const int32_t off = (signed_codes(QT) ? 128 * sr : 0) + (QT == QT_Q4_0 ? 8 * sr : 0);
  acc = act8_term(s, off, dw, dxr, acc);
  if constexpr (has_min(QT)) acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(dxr * static_cast<float>(sr)), acc);
  return acc;
}

// A row's block sums (s0: every input, or inputs 0-15 for Q6_K; s1: Q6_K's 16-31) into acc, the
// block's float epilogue; s0r the row's code sum over the block's first 16 inputs.
template <int QT>
inline __m512 act8_epilogue(__m512i s0, __m512i s1, __m512 dw, __m512 dw1, __m512 mw, float dxr, int32_t sr,
                            int32_t s0r, __m512 acc) {
  if constexpr (two_scales(QT)) {
    acc = act8_term(s0, 128 * s0r, dw, dxr, acc);
    return act8_term(s1, 128 * (sr - s0r), dw1, dxr, acc);
  } else {
    return act8_one<QT>(s0, dw, mw, dxr, sr, acc);
  }
}

// R (1 to 4) rows x the panel's 48 outputs over every block -> y[r * 48 ...]: per input quad t,
// the three groups' codes against each row's quad broadcast once, three chains a row. A panel is
// read in order, block after block (one pass over its bytes however its groups lie).
template <int QT, int R>
inline void qtile_vnni(const int8_t* xq, int64_t K, const float* dx, const int32_t* sx, const int32_t* sh,
                       const uint8_t* wb, int64_t KB, float* y) {
  const int64_t PB = panel_block_bytes(QT);
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 3; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* blk = wb + kb * PB;
    const uint8_t* codes = blk + codes_at(QT);
    __m512i s32[R][3];
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < 3; ++g) s32[r][g] = _mm512_setzero_si512();
    for (int t = 0; t < 8; ++t) {
      __m512i w[3];
      for (int g = 0; g < 3; ++g) w[g] = vnni_codes<QT>(codes + g * 64, t);
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, xq + r * K + kb * 32 + 4 * t, 4);
        const __m512i b = _mm512_set1_epi32(quad);
        for (int g = 0; g < 3; ++g) s32[r][g] = _mm512_dpbusd_epi32(s32[r][g], w[g], b);
      }
      if constexpr (two_scales(QT)) {
        if (t == 3 || t == 7) {  // Q6_K: inputs 0-15 with their scale, then 16-31 with theirs
          for (int g = 0; g < 3; ++g) {
            __m512 dw, dw1, mw;
            act8_scales<QT, V16>(blk, g * 16, dw, dw1, mw);
            for (int r = 0; r < R; ++r) {
              const int64_t i = r * KB + kb;
              acc[r][g] = t == 3 ? act8_term(s32[r][g], 128 * sh[i], dw, dx[i], acc[r][g])
                                 : act8_term(s32[r][g], 128 * (sx[i] - sh[i]), dw1, dx[i], acc[r][g]);
              s32[r][g] = _mm512_setzero_si512();
            }
          }
        }
      }
    }
    if constexpr (!two_scales(QT)) {
      for (int g = 0; g < 3; ++g) {
        __m512 dw, dw1, mw;
        act8_scales<QT, V16>(blk, g * 16, dw, dw1, mw);
        for (int r = 0; r < R; ++r) acc[r][g] = act8_one<QT>(s32[r][g], dw, mw, dx[r * KB + kb], sx[r * KB + kb], acc[r][g]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 3; ++g) _mm512_storeu_ps(y + r * BLOCK + g * 16, acc[r][g]);
}
#endif

#if defined(TS_AMX)
// The same integer block sums on AMX tiles (the `amx` build; `amx_emu` models the tiles): for up
// to 16 rows and the 16 outputs of a panel group, one TDPBSUD per block multiplies the rows' 32
// int8 codes (tile A, read in place from the quantized rows) by the block's codes laid out as
// vnni_codes lays them (tile B: its row t is vnni_codes(t), unsigned), into 16 x 16 int32 sums
// (tile C), which are stored and go through `act8_epilogue` row by row. The same integers as the
// VNNI tile's and the same epilogue: the same bits, so a pass may take this path for some row
// counts and the VNNI one for others. Q6_K's two halves (inputs 0-15, 16-31) are two products of
// 16 inputs into two C tiles. A panel's B tiles are laid out once for all the pass's rows.
//
// Rows from which a pass takes the tiles. Not measured yet (no machine with AMX has run this);
// below it the VNNI tile, whose one-row cost carries no tile store and reload.
constexpr int64_t AMX_MIN_ROWS = 4;

// Tiles: 0 (and 3) C: R rows of 16 int32; 1 (and 4) A: R rows of 32 (16) codes; 2 (and 5) B: 8 (4)
// rows of 64 bytes.
inline TileConfig act8_tiles(int R, bool halves) {
  TileConfig c;
  for (int t : {0, 3}) c.rows[t] = static_cast<uint8_t>(R), c.colsb[t] = 64;
  for (int t : {1, 4}) c.rows[t] = static_cast<uint8_t>(R), c.colsb[t] = halves ? 16 : 32;
  for (int t : {2, 5}) c.rows[t] = halves ? 4 : 8, c.colsb[t] = 64;
  if (!halves)
    for (int t : {3, 4, 5}) c.rows[t] = 0, c.colsb[t] = 0;
  return c;
}

// Every row of x (codes xq [M][K], scales dx and code sums sx, sh [M][KB]) against one panel
// (wb) -> y [M][48]. wt: KB * 3 * 512 bytes for the panel's B tiles.
template <int QT>
void qpanel_amx(const int8_t* xq, int64_t M, int64_t K, const float* dx, const int32_t* sx, const int32_t* sh,
                const uint8_t* wb, int64_t KB, uint8_t* wt, float* y) {
  const int64_t PB = panel_block_bytes(QT);
  constexpr bool halves = two_scales(QT);
  for (int64_t kb = 0; kb < KB; ++kb)
    for (int g = 0; g < 3; ++g)
      for (int t = 0; t < 8; ++t)
        _mm512_storeu_si512(wt + ((kb * 3 + g) * 8 + t) * 64, vnni_codes<QT>(wb + kb * PB + codes_at(QT) + g * 64, t));
  alignas(64) int32_t c[2][16][16];
  int configured = 0;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int R = static_cast<int>(std::min<int64_t>(16, M - m0));
    if (R != configured) tile_config(act8_tiles(R, halves)), configured = R;
    const int8_t* xr = xq + m0 * K;
    for (int g = 0; g < 3; ++g) {
      __m512 acc[16];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t kb = 0; kb < KB; ++kb) {
        const uint8_t* b = wt + (kb * 3 + g) * 512;
        TS_TILE_ZERO(0);
        if constexpr (halves) {
          TS_TILE_ZERO(3);
          TS_TILE_LOAD(1, xr + kb * 32, K);
          TS_TILE_LOAD(4, xr + kb * 32 + 16, K);
          TS_TILE_LOAD(2, b, 64);
          TS_TILE_LOAD(5, b + 256, 64);
          TS_TILE_DPBSUD(0, 1, 2);
          TS_TILE_DPBSUD(3, 4, 5);
          TS_TILE_STORE(3, c[1], 64);
        } else {
          TS_TILE_LOAD(1, xr + kb * 32, K);
          TS_TILE_LOAD(2, b, 64);
          TS_TILE_DPBSUD(0, 1, 2);
        }
        TS_TILE_STORE(0, c[0], 64);
        __m512 dw, dw1, mw;
        act8_scales<QT, V16>(wb + kb * PB, g * 16, dw, dw1, mw);
        for (int r = 0; r < R; ++r) {
          const int64_t i = (m0 + r) * KB + kb;
          acc[r] = act8_epilogue<QT>(_mm512_load_si512(c[0][r]), _mm512_load_si512(c[halves ? 1 : 0][r]), dw, dw1,
                                     mw, dx[i], sx[i], sh[i], acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (m0 + r) * BLOCK + g * 16, acc[r]);
    }
  }
  tile_release();
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
  // every quad (x_4t .. x_4t+3) broadcast to a vector once, read by a plain load in the tiles
  std::unique_ptr<__m256i[]> xb(new __m256i[M * K / 4]);
  for (int64_t i = 0; i < M * K / 4; ++i) {
    int32_t quad;
    std::memcpy(&quad, xq.data() + 4 * i, 4);
    xb[i] = _mm256_set1_epi32(quad);
  }
#endif
#if defined(TS_AMX)
  if (M >= AMX_MIN_ROWS) {
    at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> wt(KB * 3 * 512);
      std::vector<float> buf(M * BLOCK);
      for (int64_t nb = b0; nb < b1; ++nb) {
        const int64_t n0 = nb * BLOCK, nn = std::min(BLOCK, N - n0);
        qpanel_amx<QT>(xq.data(), M, K, dx.data(), sx.data(), sh.data(), wd + nb * KB * PB, KB, wt.data(), buf.data());
        store_rows(buf.data(), M, nn, yd, ldy, n0, bd, rd);
      }
    });
    return;
  }
#endif
  // four rows at a time against all 48 outputs of a panel (VNNI: 3 x 4 sums and 3 x 4 results in
  // registers), the panel read block after block
  constexpr int64_t MR = 4;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    float buf[MR * BLOCK];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const uint8_t* wb = wd + nb * KB * PB;
      const int64_t n0 = nb * BLOCK, nn = std::min(BLOCK, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t rows = std::min<int64_t>(MR, M - m0);
        const float* dr = dx.data() + m0 * KB;
        const int32_t* sr = sx.data() + m0 * KB;
        with_rows<MR>(rows, [&](auto RR) {
          constexpr int R = decltype(RR)::value;
#if defined(__AVX512VNNI__)
          qtile_vnni<QT, R>(xq.data() + m0 * K, K, dr, sr, sh.data() + m0 * KB, wb, KB, buf);
#else
          qtile_i8<QT, R>(xb.get() + m0 * K / 4, K, dr, sr, wb, KB, buf);
#endif
        });
        store_rows(buf, rows, nn, yd + m0 * ldy, ldy, n0, bd, rd ? rd + m0 * ldy : nullptr);
      }
    }
  });
}

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
                 float* yd, int64_t ldy) {
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
    with_qt(pqt, [&](auto P) { qlinear_i8_impl<decltype(P)::value>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); });
    return;
  }
  TORCH_CHECK(pqt != 0 || ldy == w.N, "matmul: float panels take no column stride");
  if (pqt == 0)
    linear_impl(xd, M, ldx, w.f, w.NB, w.K, w.N, bd, rd, yd);
  else
    with_qt(pqt, [&](auto P) { qlinear_impl<decltype(P)::value>(xd, M, ldx, w.q, w.NB, KB, w.N, bd, rd, yd, ldy); });
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
at::Tensor pack_q_rows(const at::Tensor& packed, int64_t qt_arg, int64_t N, const at::Tensor& idx) {
  const bool act8 = (qt_arg & ACT8) != 0;  // the codes in the int8-activation order, kept so
  const int64_t qt = qt_arg & ~ACT8;
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
  const int64_t CA = codes_at(pqt);
  const bool nib = nibbles(pqt);
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
          uint8_t q[32];
          get_codes(s + CA, nib, act8, static_cast<int>(si), q);
          put_codes(o + CA, nib, act8, static_cast<int>(i), q);
        }
      }
  });
  return out;
}

// Rows `idx` of the dequantized weight ([n] int64 in 0..N-1 -> [n, K] float32): the embedding
// lookup of a tied or quantized table, and the dense read-back.
template <int QT>
void qrows_impl(const uint8_t* wd, int64_t KB, bool act8, const int64_t* idx, int64_t n, float* out) {
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
        uint8_t c[32];
        get_codes(blk + codes_at(QT), nibbles(QT), act8, static_cast<int>(i), c);
        for (int k = 0; k < 32; ++k) {
          const float q = nibbles(QT) ? float(c[k]) : float(int8_t(c[k]));
          const float dk = k < 16 ? d0 : d1;
          o[kb * 32 + k] = mul_only(QT) ? q * dk : std::fma(q, dk, m);
        }
      }
    }
  });
}

at::Tensor qrows(const at::Tensor& packed, int64_t qt_arg, int64_t N, const at::Tensor& idx) {
  const bool act8 = (qt_arg & ACT8) != 0;
  const int64_t qt = qt_arg & ~ACT8;
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
  with_qt(panel_qt(qt), [&](auto P) { qrows_impl<decltype(P)::value>(wd, KB, act8, id, n, od); });
  std::vector<int64_t> shape(idx.sizes().begin(), idx.sizes().end());
  shape.push_back(KB * 32);
  return out.view(shape);
}

// A packed matrix's codes moved in place into the int8-activation order (act8) or back to the
// float order: what a loaded model's matrices take when int8 activations are turned on or off.
// The headers stay; the codes are the same, so the dequantized weights are too.
void relayout_q(const at::Tensor& packed, int64_t qt, bool act8) {
  check_qt(qt);
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == panel_block_bytes(qt), "relayout_q: packed [NB, K/32, PB] uint8 expected");
  const int pqt = panel_qt(qt);
  const bool nib = nibbles(pqt);
  const int64_t blocks = packed.size(0) * packed.size(1), PB = packed.size(2), CA = codes_at(pqt), n = PB - CA;
  uint8_t* base = packed.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> was(n);
    uint8_t q[32];
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* codes = base + b * PB + CA;
      std::memcpy(was.data(), codes, n);
      for (int i = 0; i < BLOCK; ++i) {
        get_codes(was.data(), nib, !act8, i, q);
        put_codes(codes, nib, act8, i, q);
      }
    }
  });
}

}  // namespace TS_NS

TORCH_LIBRARY_FRAGMENT(TS_NS, m) {
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("pack_q(Tensor raw, int qtype, int k) -> Tensor");
  m.def("qlinear(Tensor x, Tensor packed, int qtype, int n, Tensor? bias) -> Tensor");
  m.def("qrows(Tensor packed, int qtype, int n, Tensor idx) -> Tensor");
  m.def("pack_q_rows(Tensor packed, int qtype, int n, Tensor idx) -> Tensor");
  m.def("relayout_q(Tensor(a!) packed, int qtype, bool act8) -> ()");
}

TORCH_LIBRARY_IMPL(TS_NS, CPU, m) {
  m.impl("pack_linear", &TS_NS::pack_linear);
  m.impl("linear", &TS_NS::linear);
  m.impl("pack_q", &TS_NS::pack_q);
  m.impl("qlinear", &TS_NS::qlinear);
  m.impl("qrows", &TS_NS::qrows);
  m.impl("pack_q_rows", &TS_NS::pack_q_rows);
  m.impl("relayout_q", &TS_NS::relayout_q);
}
