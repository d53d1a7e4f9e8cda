// The AMX tile operations the int8 matmul uses (linear.cpp), as the instructions (the `amx`
// level, built with -mamx-tile -mamx-int8) or as a model of them in AVX-512 code (TS_AMX_EMU,
// the `amx_emu` build the tests load where the CPU has no AMX). The model follows the Intel
// SDM's pseudocode: a tile is up to 16 rows of up to 64 bytes with its shape from the loaded
// configuration; a load fills the configured rows and columns and zeroes the rest; TDPBSUD adds
// to C[m][n] the four products of A's signed bytes 4k..4k+3 of row m with B's unsigned bytes of
// row k at column group n, for k < A's colsb / 4, in 32-bit integers without saturation; shapes
// that do not match (C rows != A rows, A colsb / 4 != B rows, C colsb != B colsb) fault, as the
// instruction raises #UD. Integer sums are exact, so the model and the instruction agree on any
// order of their products: what the model checks is the layout (which bytes meet which).
// TDPBF16PS (AMX-BF16, bfloat16 attention in the tiles' order) is modelled after the SDM's
// pseudocode, which fixes an order: per row m and output n, the even elements' products
// a[2k] b[2k] over the instruction's k = 0 .. A colsb / 4 - 1 chained by FMAs into one float32 sum
// from zero, the odd elements' into another, then C = C + (even + odd); every step rounds to
// nearest even with denormal inputs read as zero and denormal results flushed (DAZ, FTZ). Whether
// the hardware sums in exactly that order is for a machine with AMX to confirm (`tile_dpbf16ps`
// runs one instruction on given tiles; tests/test_amx_bf16.py compares it with that order).
#pragma once

#include "common.h"

#if defined(__AMX_INT8__) || defined(TS_AMX_EMU)
#define TS_AMX 1
#if defined(__AMX_BF16__) || defined(TS_AMX_EMU)
#define TS_AMX_BF16 1
#endif

namespace TS_NS {

// The 64-byte operand of LDTILECFG (palette 1): per tile its bytes a row and its rows
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

#if defined(TS_AMX_EMU)
struct EmuTiles {
  alignas(64) uint8_t t[8][16][64];
  TileConfig cfg;
  bool configured = false;
};
inline EmuTiles& emu_tiles() {
  thread_local EmuTiles e;
  return e;
}
inline void tile_config(const TileConfig& c) {
  // what LDTILECFG faults on (#GP), so that the model is no more permissive than the hardware
  TORCH_CHECK(c.palette == 1 && c.start_row == 0, "amx_emu: palette must be 1 and start_row 0");
  for (int t = 0; t < 16; ++t)
    TORCH_CHECK(c.rows[t] <= 16 && c.colsb[t] <= 64 && (c.rows[t] == 0) == (c.colsb[t] == 0) && (t < 8 || !c.rows[t]),
                "amx_emu: tile ", t, " configured with ", int(c.rows[t]), " rows of ", int(c.colsb[t]), " bytes");
  for (uint8_t b : c.reserved) TORCH_CHECK(b == 0, "amx_emu: reserved bytes of the configuration must be zero");
  EmuTiles& e = emu_tiles();
  e.cfg = c;
  e.configured = true;
  std::memset(e.t, 0, sizeof(e.t));  // LDTILECFG zeroes every tile
}
inline void tile_release() { emu_tiles().configured = false; }
inline void emu_check(int t) {
  TORCH_CHECK(emu_tiles().configured && emu_tiles().cfg.rows[t] > 0 && emu_tiles().cfg.colsb[t] > 0, "amx_emu: tile ",
              t, " used unconfigured");
}
template <int T>
inline void tile_load(const void* p, int64_t stride) {
  emu_check(T);
  EmuTiles& e = emu_tiles();
  const int rows = e.cfg.rows[T], colsb = e.cfg.colsb[T];
  const uint8_t* src = static_cast<const uint8_t*>(p);
  std::memset(e.t[T], 0, sizeof(e.t[T]));
  for (int r = 0; r < rows; ++r) std::memcpy(e.t[T][r], src + r * stride, colsb);
}
template <int T>
inline void tile_store(void* p, int64_t stride) {
  emu_check(T);
  EmuTiles& e = emu_tiles();
  for (int r = 0; r < e.cfg.rows[T]; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, e.t[T][r], e.cfg.colsb[T]);
}
template <int T>
inline void tile_zero() {
  emu_check(T);
  std::memset(emu_tiles().t[T], 0, sizeof(emu_tiles().t[T]));
}
// A dot product's operand tiles: configured, and shaped as the instruction requires (C rows = A
// rows, A's dwords a row = B rows, C colsb = B colsb), else it faults (#UD)
template <int C, int A, int B>
inline EmuTiles& emu_dot_operands(const char* op) {
  static_assert(C != A && C != B && A != B, "a tile dot product's three tiles must differ (#UD)");
  emu_check(C), emu_check(A), emu_check(B);
  EmuTiles& e = emu_tiles();
  const TileConfig& c = e.cfg;
  TORCH_CHECK(c.rows[C] == c.rows[A] && c.colsb[A] / 4 == c.rows[B] && c.colsb[C] == c.colsb[B], "amx_emu: ", op,
              " shapes do not match (#UD)");
  return e;
}

template <int C, int A, int B>
inline void tile_dpbsud() {
  EmuTiles& e = emu_dot_operands<C, A, B>("tdpbsud");
  const TileConfig& c = e.cfg;
  TORCH_CHECK(c.colsb[C] == 64, "amx_emu: tdpbsud is modelled for 16 outputs a row");
  for (int m = 0; m < c.rows[C]; ++m) {
    __m512i acc = _mm512_loadu_si512(e.t[C][m]);
    for (int k = 0; k < c.colsb[A] / 4; ++k) {
      int32_t quad;
      std::memcpy(&quad, e.t[A][m] + 4 * k, 4);
      // vpdpbusd: unsigned bytes of its first source times signed bytes of its second, four a
      // lane, added without saturation: TDPBSUD's DPBD with A (signed) and B (unsigned) swapped
      acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(e.t[B][k]), _mm512_set1_epi32(quad));
    }
    _mm512_storeu_si512(e.t[C][m], acc);
  }
}
#define TS_TILE_LOAD(t, p, stride) tile_load<t>(p, stride)
#define TS_TILE_STORE(t, p, stride) tile_store<t>(p, stride)
#define TS_TILE_ZERO(t) tile_zero<t>()
#define TS_TILE_DPBSUD(c, a, b) tile_dpbsud<c, a, b>()

template <int C, int A, int B>
inline void tile_dpbf16ps() {
  EmuTiles& e = emu_dot_operands<C, A, B>("tdpbf16ps");
  const TileConfig& c = e.cfg;
  const __mmask16 live = static_cast<__mmask16>((1u << (c.colsb[C] / 4)) - 1);
  FlushDenormals ftz;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int m = 0; m < c.rows[C]; ++m) {
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    for (int k = 0; k < c.colsb[A] / 4; ++k) {
      uint32_t pair;
      std::memcpy(&pair, e.t[A][m] + 4 * k, 4);
      const __m512 ae = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(pair << 16)));
      const __m512 ao = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(pair & 0xFFFF0000u)));
      const __m512i b = _mm512_loadu_si512(e.t[B][k]);
      even = _mm512_fmadd_ps(ae, _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), even);
      odd = _mm512_fmadd_ps(ao, _mm512_castsi512_ps(_mm512_and_si512(b, hi)), odd);
    }
    const __m512 acc = _mm512_add_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(e.t[C][m])), _mm512_add_ps(even, odd));
    _mm512_mask_storeu_ps(reinterpret_cast<float*>(e.t[C][m]), live, acc);
  }
}
#define TS_TILE_DPBF16PS(c, a, b) tile_dpbf16ps<c, a, b>()
#else
inline void tile_config(const TileConfig& c) { _tile_loadconfig(&c); }
inline void tile_release() { _tile_release(); }
// The intrinsics paste their tile numbers into the instruction's text: literal numbers only. A
// tile load's asm tells the compiler of no memory it reads: the barrier keeps the stores that
// fill its buffer (B tiles laid out just before) ahead of it whatever the optimiser does.
#define TS_TILE_LOAD(t, p, stride)        \
  do {                                    \
    __asm__ __volatile__("" ::: "memory"); \
    _tile_loadd(t, p, stride);            \
  } while (0)
#define TS_TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define TS_TILE_ZERO(t) _tile_zero(t)
#define TS_TILE_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)
#if defined(__AMX_BF16__)
#define TS_TILE_DPBF16PS(c, a, b) _tile_dpbf16ps(c, a, b)
#endif
#endif

}  // namespace TS_NS

#endif
