// Direct depthwise convolution on the CPU for channels-last float32 and bfloat16 maps (float32 arithmetic): stride 1, "same" padding
// (dilation * (K - 1) / 2 pixels), odd K, any dilation.
//
// Layout: x and the output are (B, H, W, C) in memory (a channels-last NCHW tensor), the weight is given as
// (K, K, C). Work is split into tasks of (image, band of output rows). Each task copies the input rows its band reads
// into a zero-padded local buffer of (rows + K - 1) x (W + K - 1) pixels with C rounded up to the vector width, so the
// inner loops have no bounds checks and no channel tail. The forward pass keeps a row segment of up to kMaxWidth
// output pixels times one 16-channel vector in registers and streams the K x K taps over it (for the common kernel
// sizes, on AVX-512, with a kernel row's weights in registers too, so each input pixel is loaded once per kernel
// row), skipping the kernel rows that meet only the zero padding above and below the image; the weight gradient keeps
// one kernel row's K taps (in groups) in registers and streams the output gradient over them (for 13, 7 and 5, with
// 14 or 7 output-gradient pixels at a time held in registers too). The input gradient is
// the forward pass with the kernel rotated by 180 degrees.
//
// The same extension holds what the blocks' fast path runs in one call at inference: GRN's spatial sum of squares
// (spatial_sum) and channel factor, and squeeze-and-excitation's channel factor; and the stem's and downsampling
// layers' LayerNorm over channels, with the stem's GELU after it (layer_norm_channels_last).
//
// Vectors are GCC vector extensions, so the same source compiles to AVX-512, AVX2 or SSE as the machine has.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <new>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

constexpr int kMaxWidth = 14;    // output pixels per register block in the forward pass (kernels compiled)
constexpr int kMaxTapGroup = 16; // kernel taps per register block in the weight gradient (kernels compiled)
// How many of those the blocks use: a 16-lane vector is one of AVX-512's 32 registers, so 14 sums (or 16 taps) fit
// beside the weights and inputs. With AVX2 a vector takes two of its 16 registers, and blocks that wide would keep
// their sums on the stack (a load and a store around every multiply-add); there they are at most 7 wide (14 of the
// 16 registers for the sums; 7 divides every stage width of UniRepLKNet at 224 px).
#ifdef __AVX512F__
constexpr int kBlockWidth = kMaxWidth;
constexpr int kTapGroup = kMaxTapGroup;
#else
constexpr int kBlockWidth = 7;  // 5 to 8 timed on a 2-core AVX2 AMD EPYC: 7 fastest or tied
constexpr int kTapGroup = 7;    // 4 to 7 timed there: 7 fastest
#endif
static_assert(kBlockWidth >= 1 && kBlockWidth <= kMaxWidth && kTapGroup >= 1 && kTapGroup <= kMaxTapGroup);
constexpr int64_t kBandPixels = 4096;  // about this many padded input pixels per task (a few hundred KiB)

// Zero-initialised float buffer on a 64-byte boundary: the buffers' vectors then never straddle two cache lines
// (a split load takes two of the core's load slots).
class Buffer {
 public:
  explicit Buffer(int64_t n) : data_(static_cast<float*>(std::aligned_alloc(64, bytes(n)))) {
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_, 0, bytes(n));
  }
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data() { return data_; }
  const float* data() const { return data_; }
  float& operator[](int64_t i) { return data_[i]; }
  float operator[](int64_t i) const { return data_[i]; }

 private:
  static size_t bytes(int64_t n) { return (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64; }
  float* data_;
};

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// The convolutions' register blocks keep their sums, weights and inputs as `rvec`s: 16 floats in registers. With
// AVX-512 that is one `vec`. Without it GCC lowers a 64-byte vector it has no register for clumsily (arrays of them
// go through the stack in 8-byte pieces: on an AVX2 CPU the forward pass ran at a third of oneDNN's speed), so
// there an rvec is a struct of the widest vectors the target has, each kept in its own register; per lane the
// arithmetic is the same.
#ifdef __AVX512F__
typedef vec rvec;
inline rvec rload(const float* p) { return load(p); }
inline void rstore(float* p, rvec v) { store(p, v); }
inline rvec to_rvec(vec v) { return v; }
#else
#ifdef __AVX__
constexpr int kPartLanes = 8;
#else
constexpr int kPartLanes = 4;
#endif
constexpr int kParts = kLanes / kPartLanes;
typedef float part __attribute__((vector_size(kPartLanes * sizeof(float))));
typedef float part_unaligned __attribute__((vector_size(kPartLanes * sizeof(float)), aligned(4)));
struct rvec {
  part p[kParts];
};
inline rvec rload(const float* x) {
  rvec v;
#pragma GCC unroll 4
  for (int j = 0; j < kParts; ++j) v.p[j] = *reinterpret_cast<const part_unaligned*>(x + j * kPartLanes);
  return v;
}
inline void rstore(float* x, const rvec& v) {
#pragma GCC unroll 4
  for (int j = 0; j < kParts; ++j) *reinterpret_cast<part_unaligned*>(x + j * kPartLanes) = v.p[j];
}
inline rvec to_rvec(vec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  return rload(lanes);
}
inline rvec operator*(const rvec& a, const rvec& b) {
  rvec r;
#pragma GCC unroll 4
  for (int j = 0; j < kParts; ++j) r.p[j] = a.p[j] * b.p[j];
  return r;
}
inline rvec& operator+=(rvec& a, const rvec& b) {
#pragma GCC unroll 4
  for (int j = 0; j < kParts; ++j) a.p[j] += b.p[j];
  return a;
}
#endif

// bfloat16 maps are read into the float32 buffers and written back with round-to-nearest-even: all arithmetic is
// float32. A bfloat16 value is the upper half of a float32's bits.
typedef uint16_t hvec __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));
typedef uint32_t uvec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline vec load_float(const float* p) { return load(p); }
inline vec load_float(const uint16_t* p) {
  const uvec bits = __builtin_convertvector(*reinterpret_cast<const hvec*>(p), uvec) << 16;
  vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline hvec to_bfloat16(vec v) {
  uvec bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uvec nan = reinterpret_cast<uvec>((bits & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
  const uvec rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return __builtin_convertvector((rounded & ~nan) | (nan & 0x7fc0u), hvec);
}
// the first `valid` lanes of v to p
inline void store_lanes(float* p, vec v, int64_t valid) {
  if (valid == kLanes) store(p, v);
  else std::memcpy(p, &v, sizeof(float) * valid);
}
inline void store_lanes(uint16_t* p, vec v, int64_t valid) {
  const hvec h = to_bfloat16(v);
  if (valid == kLanes) *reinterpret_cast<hvec*>(p) = h;
  else std::memcpy(p, &h, sizeof(uint16_t) * valid);
}
#ifndef __AVX512F__
inline void store_lanes(float* p, const rvec& v, int64_t valid) {
  if (valid == kLanes) rstore(p, v);
  else std::memcpy(p, &v, sizeof(float) * valid);
}
inline void store_lanes(uint16_t* p, const rvec& v, int64_t valid) {
  vec w;
  std::memcpy(&w, &v, sizeof w);
  store_lanes(p, w, valid);
}
#endif
// one pixel's 16 channels from a map into a float32 buffer
inline void copy_lanes(float* dst, const float* src) { rstore(dst, rload(src)); }
inline void copy_lanes(float* dst, const uint16_t* src) { store(dst, load_float(src)); }

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One 16-channel block (channels c0 .. c0 + 15) of the padded rows [row0 - pad, row0 + rows + pad) of image b of
// x (B, H, W, C), into buf ((rows + 2 pad) x (W + 2 pad) x 16): zeros outside the image and past channel C. The block
// is contiguous, so the inner loops read consecutive cache lines (reading a channels-last map in place steps by
// 4C bytes per pixel, which maps every access of a 16-channel column to a quarter of the L1 cache's sets).
template <typename T>
void fill_block(const T* x, int64_t b, int64_t row0, int64_t rows, int64_t H, int64_t W, int64_t C, int64_t c0,
                int64_t pad, float* buf) {
  const int64_t Wp = W + 2 * pad;
  const int64_t valid = std::min<int64_t>(kLanes, C - c0);
  for (int64_t r = 0; r < rows + 2 * pad; ++r) {
    float* dst = buf + r * Wp * kLanes;
    const int64_t ih = row0 - pad + r;
    if (ih < 0 || ih >= H) {
      std::memset(dst, 0, sizeof(float) * Wp * kLanes);
      continue;
    }
    std::memset(dst, 0, sizeof(float) * pad * kLanes);
    std::memset(dst + (pad + W) * kLanes, 0, sizeof(float) * pad * kLanes);
    const T* src = x + ((b * H + ih) * W) * C + c0;
    dst += pad * kLanes;
    if (valid == kLanes) {
      for (int64_t w = 0; w < W; ++w) copy_lanes(dst + w * kLanes, src + w * C);
    } else {
      for (int64_t w = 0; w < W; ++w) {
        std::memset(dst + w * kLanes, 0, sizeof(float) * kLanes);
        for (int64_t i = 0; i < valid; ++i) dst[w * kLanes + i] = to_float(src[w * C + i]);
      }
    }
  }
}

// One register block of the forward pass: out[i] (i < N) = bias + sum_{kh, kw} in[kh][i + kw] * w[kh][kw] for one
// 16-channel vector, over the kernel rows kh0 <= kh < kh1 (the rows that fall inside the image: the others read only
// the zero padding). `in` points at padded pixel (row, col) of the block's first output in a fill_block buffer, `w`
// at tap (0, 0) of the block's (K, K, 16) weights.
template <int N, typename T>
inline void forward_block(const float* in, const float* w, vec bias, T* out, int64_t K, int64_t dil,
                          int64_t Wp, int64_t out_stride, int64_t valid, int64_t kh0, int64_t kh1) {
  rvec acc[N];
  const rvec start = to_rvec(bias);
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) acc[i] = start;
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    const float* row = in + kh * dil * Wp * kLanes;
    const float* wrow = w + kh * K * kLanes;
    for (int64_t kw = 0; kw < K; ++kw) {
      const rvec wv = rload(wrow + kw * kLanes);
      const float* src = row + kw * dil * kLanes;
#pragma GCC unroll 16
      for (int i = 0; i < N; ++i) acc[i] += rload(src + i * kLanes) * wv;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) store_lanes(out + i * out_stride, acc[i], valid);
}

// forward_block for a kernel of KS taps per row at dilation DIL, the kernel row's KS weights held in registers beside
// the N sums: each padded input pixel of the row is loaded once and multiplied into every sum it reaches
// (N + (KS - 1) * DIL loads per kernel row instead of N * KS). Each sum takes its taps in the same order as in
// forward_block, so the results are the same bits. N + KS must stay within the 32 vector registers.
template <int N, int KS, int DIL, typename T>
inline void forward_block_reuse(const float* in, const float* w, vec bias, T* out, int64_t, int64_t, int64_t Wp,
                                int64_t out_stride, int64_t valid, int64_t kh0, int64_t kh1) {
  vec acc[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) acc[i] = bias;
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    const float* row = in + kh * DIL * Wp * kLanes;
    vec wv[KS];
#pragma GCC unroll 16
    for (int k = 0; k < KS; ++k) wv[k] = load(w + (kh * KS + k) * kLanes);
#pragma GCC unroll 64
    for (int p = 0; p < N + (KS - 1) * DIL; ++p) {
      const vec v = load(row + p * kLanes);
#pragma GCC unroll 16
      for (int k = 0; k < KS; ++k) {
        if (p - k * DIL >= 0 && p - k * DIL < N) acc[p - k * DIL] += v * wv[k];
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) store_lanes(out + i * out_stride, acc[i], valid);
}

template <typename T>
using ForwardBlockFn = void (*)(const float*, const float*, vec, T*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                int64_t, int64_t);
template <typename T>
constexpr ForwardBlockFn<T> kForwardBlocks[kMaxWidth + 1] = {
    nullptr,
    forward_block<1, T>,  forward_block<2, T>,  forward_block<3, T>,  forward_block<4, T>,  forward_block<5, T>,
    forward_block<6, T>,  forward_block<7, T>,  forward_block<8, T>,  forward_block<9, T>,  forward_block<10, T>,
    forward_block<11, T>, forward_block<12, T>, forward_block<13, T>, forward_block<14, T>,
};
template <int KS, int DIL, typename T>
constexpr ForwardBlockFn<T> kReuseBlocks[kMaxWidth + 1] = {
    nullptr,
    forward_block_reuse<1, KS, DIL, T>,  forward_block_reuse<2, KS, DIL, T>,  forward_block_reuse<3, KS, DIL, T>,
    forward_block_reuse<4, KS, DIL, T>,  forward_block_reuse<5, KS, DIL, T>,  forward_block_reuse<6, KS, DIL, T>,
    forward_block_reuse<7, KS, DIL, T>,  forward_block_reuse<8, KS, DIL, T>,  forward_block_reuse<9, KS, DIL, T>,
    forward_block_reuse<10, KS, DIL, T>, forward_block_reuse<11, KS, DIL, T>, forward_block_reuse<12, KS, DIL, T>,
    forward_block_reuse<13, KS, DIL, T>, forward_block_reuse<14, KS, DIL, T>,
};

// The forward blocks for kernel size K at dilation dil: the register-reuse ones for the deploy form's 13x13 (and the
// 7x7, 5x5 and 3x3 a block may be given) and the 5x5 and 7x7 training branches of the Dilated Reparam Blocks (at
// dilations 1 and 2), the general ones otherwise. 3x3 kernels wait on memory, not arithmetic: the reuse only keeps
// them where they were (0.97-1.00x; with the general blocks and the row skipping they measured 0.93-0.96x the earlier
// kernels, `benchmarks/dwconv_versions.py`). At 17x17 the weights and sums would not fit the registers.
// Only where a vector is one register (AVX-512's 32): with narrower registers the sums and weights would spill.
template <typename T>
const ForwardBlockFn<T>* forward_blocks(int64_t K, int64_t dil) {
#ifdef __AVX512F__
  if (dil == 1) {
    switch (K) {
      case 13: return kReuseBlocks<13, 1, T>;
      case 7: return kReuseBlocks<7, 1, T>;
      case 5: return kReuseBlocks<5, 1, T>;
      case 3: return kReuseBlocks<3, 1, T>;
      default: break;
    }
  } else if (dil == 2) {
    switch (K) {
      case 7: return kReuseBlocks<7, 2, T>;
      case 5: return kReuseBlocks<5, 2, T>;
      default: break;
    }
  }
#endif
  return kForwardBlocks<T>;
}

// The register block width for rows of W pixels: as few blocks as kBlockWidth allows, of (nearly) equal width, so a
// 14- or 28-pixel row runs 14-wide blocks instead of 8 + 6.
int64_t block_width(int64_t W) {
  const int64_t blocks = (W + kBlockWidth - 1) / kBlockWidth;
  return (W + blocks - 1) / blocks;
}

int64_t band_rows(int64_t H, int64_t W, int64_t pad) {
  return std::max<int64_t>(1, std::min<int64_t>(H, kBandPixels / (W + 2 * pad)));
}

// The kernel rows [first, last) that output row oh reads inside the image (input row oh - pad + kh * dil in [0, H)):
// the rest read zero padding only and are skipped. At T's 14x14 maps a 13x13 kernel has 23% of its rows outside, at
// 7x7 maps 46%.
struct KernelRows {
  int64_t first, last;
};
inline KernelRows kernel_rows(int64_t oh, int64_t H, int64_t K, int64_t dil, int64_t pad) {
  const int64_t top = pad - oh;                // input row oh - pad + kh * dil >= 0  <=>  kh * dil >= top
  const int64_t first = top > 0 ? (top + dil - 1) / dil : 0;
  const int64_t bottom = H - 1 + pad - oh;     // ... <= H - 1  <=>  kh * dil <= bottom
  const int64_t last = bottom < 0 ? 0 : std::min<int64_t>(K, bottom / dil + 1);
  return {std::min(first, last), last};
}

// y (B, H, W, C) = depthwise(x (B, H, W, C), wb, dilation dil) + bias (C), with the weights blocked as
// wb (Cp / 16, K, K, 16), zeros past channel C (blocked_weight)
template <typename T>
void forward_impl(const T* x, const float* wb, const float* bias, T* y, int64_t B, int64_t H, int64_t W,
                  int64_t C, int64_t K, int64_t dil) {
  const int64_t pad = dil * (K / 2);
  const int64_t blocks = round_up(C, kLanes) / kLanes;
  const int64_t Wp = W + 2 * pad;
  Buffer bp(blocks * kLanes);
  if (bias != nullptr) std::memcpy(bp.data(), bias, sizeof(float) * C);
  const int64_t rows = band_rows(H, W, pad);
  const int64_t bands = (H + rows - 1) / rows;
  const int64_t width = block_width(W);
  const ForwardBlockFn<T>* kernels = forward_blocks<T>(K, dil);
  at::parallel_for(0, B * bands * blocks, 1, [&](int64_t begin, int64_t end) {
    Buffer buf((rows + 2 * pad) * Wp * kLanes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cb = task % blocks, band = task / blocks;
      const int64_t b = band / bands, row0 = (band % bands) * rows;
      const int64_t n_rows = std::min(rows, H - row0), c0 = cb * kLanes;
      const int64_t valid = std::min<int64_t>(kLanes, C - c0);
      fill_block(x, b, row0, n_rows, H, W, C, c0, pad, buf.data());
      const vec bv = load(bp.data() + c0);
      const float* wc = wb + cb * K * K * kLanes;
      for (int64_t r = 0; r < n_rows; ++r) {
        T* out_row = y + ((b * H + row0 + r) * W) * C + c0;
        const KernelRows kh = kernel_rows(row0 + r, H, K, dil, pad);
        for (int64_t ow = 0; ow < W; ow += width) {
          const int64_t n = std::min<int64_t>(width, W - ow);
          kernels[n](buf.data() + (r * Wp + ow) * kLanes, wc, bv, out_row + ow * C, K, dil, Wp, C, valid, kh.first,
                     kh.last);
        }
      }
    }
  });
}

// acc[j] += g[ow] * in[ow + j * dil] for the output-gradient pixels begin <= ow < end, one at a time
template <int N>
__attribute__((always_inline)) inline void weight_grad_pixels(const float* g, const float* in, rvec* acc,
                                                             int64_t begin, int64_t end, int64_t dil) {
  for (int64_t ow = begin; ow < end; ++ow) {
    const rvec gv = rload(g + ow * kLanes);
    const float* src = in + ow * kLanes;
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) acc[j] += gv * rload(src + j * dil * kLanes);
  }
}

// Weight-gradient register block: acc[j] += sum_ow g[ow] * in[ow + j * dil] for N taps j of one kernel row.
template <int N>
inline void weight_grad_block(const float* g, const float* in, float* dw, int64_t W, int64_t dil) {
  rvec acc[N];
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) acc[j] = rload(dw + j * kLanes);
  weight_grad_pixels<N>(g, in, acc, 0, W, dil);
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) rstore(dw + j * kLanes, acc[j]);
}

typedef void (*WeightGradBlockFn)(const float*, const float*, float*, int64_t, int64_t);
const WeightGradBlockFn kWeightGradBlocks[kMaxTapGroup + 1] = {
    nullptr,
    weight_grad_block<1>,  weight_grad_block<2>,  weight_grad_block<3>,  weight_grad_block<4>,
    weight_grad_block<5>,  weight_grad_block<6>,  weight_grad_block<7>,  weight_grad_block<8>,
    weight_grad_block<9>,  weight_grad_block<10>, weight_grad_block<11>, weight_grad_block<12>,
    weight_grad_block<13>, weight_grad_block<14>, weight_grad_block<15>, weight_grad_block<16>,
};

// M output-gradient pixels of weight_grad_block at dilation DIL, with those M gradient vectors held in registers
// beside the N sums: each input pixel they reach is loaded once and multiplied into every sum it meets
// (M + (N - 1) * DIL loads instead of M * (N + 1)). Every sum takes its pixels in the same order as in
// weight_grad_block.
template <int N, int M, int DIL>
__attribute__((always_inline)) inline void weight_grad_chunk(const float* g, const float* in, vec* acc) {
  vec gv[M];
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) gv[i] = load(g + i * kLanes);
#pragma GCC unroll 64
  for (int q = 0; q < M + (N - 1) * DIL; ++q) {
    const vec v = load(in + q * kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {
      if (q - j * DIL >= 0 && q - j * DIL < M) acc[j] += gv[q - j * DIL] * v;
    }
  }
}

// weight_grad_block for N taps at dilation DIL through weight_grad_chunk: chunks of 14 pixels, then of 7, then the
// rest one pixel at a time (as weight_grad_block takes them)
template <int N, int DIL>
void weight_grad_block_reuse(const float* g, const float* in, float* dw, int64_t W, int64_t) {
  vec acc[N];
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) acc[j] = load(dw + j * kLanes);
  int64_t ow = 0;
  for (; ow + 14 <= W; ow += 14) weight_grad_chunk<N, 14, DIL>(g + ow * kLanes, in + ow * kLanes, acc);
  for (; ow + 7 <= W; ow += 7) weight_grad_chunk<N, 7, DIL>(g + ow * kLanes, in + ow * kLanes, acc);
  weight_grad_pixels<N>(g, in, acc, ow, W, DIL);
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) store(dw + j * kLanes, acc[j]);
}

// The weight-gradient block for a kernel row of K taps (one group: K <= kMaxTapGroup) at dilation dil: the
// register-reuse ones on AVX-512 for 13, 7 and 5 (7 and 5 at dilation 2 too), the general ones otherwise.
WeightGradBlockFn weight_grad_blocks(int64_t K, int64_t dil) {
#ifdef __AVX512F__
  if (dil == 1) {
    switch (K) {
      case 13: return weight_grad_block_reuse<13, 1>;
      case 7: return weight_grad_block_reuse<7, 1>;
      case 5: return weight_grad_block_reuse<5, 1>;
      default: break;
    }
  } else if (dil == 2) {
    switch (K) {
      case 7: return weight_grad_block_reuse<7, 2>;
      case 5: return weight_grad_block_reuse<5, 2>;
      default: break;
    }
  }
#endif
  return K <= kTapGroup ? kWeightGradBlocks[K] : nullptr;
}

// The tap-group size for kernel rows of K taps: the widest on AVX-512; with AVX2's narrower groups, as few as
// kTapGroup allows, of (nearly) equal size (13 taps as 5 + 4 + 4, not 6 + 6 + 1). Each tap's sum takes the pixels
// in the same order however the taps are grouped.
int64_t tap_group(int64_t K) {
#ifdef __AVX512F__
  return std::min<int64_t>(K, kTapGroup);
#else
  const int64_t groups = (K + kTapGroup - 1) / kTapGroup;
  return (K + groups - 1) / groups;
#endif
}

// dw (K, K, C) = sum_{b, oh, ow} g[b, oh, ow] * xpad[b, oh + kh dil, ow + kw dil]
template <typename T>
void weight_grad_impl(const T* x, const T* g, float* dw, int64_t B, int64_t H, int64_t W, int64_t C,
                      int64_t K, int64_t dil) {
  const int64_t pad = dil * (K / 2);
  const int64_t blocks = round_up(C, kLanes) / kLanes;
  const int64_t Wp = W + 2 * pad;
  const int64_t rows = band_rows(H, W, pad);
  const int64_t bands = (H + rows - 1) / rows;
  const int64_t threads = at::get_num_threads();
  const int64_t taps = K * K * kLanes;  // one channel block's gradient
  Buffer partial(threads * blocks * taps);
  const WeightGradBlockFn whole_row = weight_grad_blocks(K, dil);  // a kernel row in one group (K <= kTapGroup)
  const int64_t group = tap_group(K);
  at::parallel_for(0, B * bands * blocks, 1, [&](int64_t begin, int64_t end) {
    Buffer buf((rows + 2 * pad) * Wp * kLanes);
    Buffer grad(rows * W * kLanes);
    float* acc = partial.data() + at::get_thread_num() * blocks * taps;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cb = task % blocks, band = task / blocks;
      const int64_t b = band / bands, row0 = (band % bands) * rows;
      const int64_t n_rows = std::min(rows, H - row0), c0 = cb * kLanes;
      fill_block(x, b, row0, n_rows, H, W, C, c0, pad, buf.data());
      fill_block(g, b, row0, n_rows, H, W, C, c0, 0, grad.data());
      float* dwc = acc + cb * taps;
      for (int64_t r = 0; r < n_rows; ++r) {
        const KernelRows rows_in = kernel_rows(row0 + r, H, K, dil, pad);
        for (int64_t kh = rows_in.first; kh < rows_in.last; ++kh) {
          const float* in_row = buf.data() + (r + kh * dil) * Wp * kLanes;
          for (int64_t kw0 = 0; kw0 < K; kw0 += group) {
            const int64_t n = std::min<int64_t>(group, K - kw0);
            (n == K ? whole_row : kWeightGradBlocks[n])(grad.data() + r * W * kLanes, in_row + kw0 * dil * kLanes,
                                 dwc + (kh * K + kw0) * kLanes, W, dil);
          }
        }
      }
    }
  });
  for (int64_t t = 0; t < K * K; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      float sum = 0.f;
      for (int64_t p = 0; p < threads; ++p) sum += partial[(p * blocks + c / kLanes) * taps + t * kLanes + c % kLanes];
      dw[t * C + c] = sum;
    }
  }
}

// s (B, C) = sum over the P pixels of x (B, P, C), squared (GRN's norm) or not (SE's pooling), float32 or bfloat16
// read as float32, in one pass with no temporary map, in one of two orders. Partial sums over kSumRun pixels are
// added to the total, so the rounding error grows with P / kSumRun + kSumRun rather than with P; each channel's
// additions run in pixel order either way.
// * By columns (maps that fit the caches): each task sums kSumVectors vectors of channels of one image over all its
//   pixels, in registers.
// * By rows (larger maps): each task sums a span of channels of one image (the spans as wide as leave every thread
//   a few tasks) pixel row by pixel row, so it streams through contiguous memory, the running sums in a small
//   buffer. On 2 cores (AMD EPYC, AVX-512), batch 16: 2.4 against 7.9 ms by columns at 56x56x320, whose strided
//   reads get a fraction of the memory bandwidth, 0.80 against 1.58 ms at 28x28x640, 0.15 against 0.18 ms at
//   14x14x1280 (16 MiB); at batch 1 (4 MiB and less, in the caches) columns took half the time of rows.
constexpr int kSumVectors = 4;
constexpr int64_t kSumRun = 64;
constexpr int64_t kSumRowsFromBytes = 8 << 20;  // maps of at least this many bytes are summed by rows
constexpr int64_t kSumTasksPerThread = 4;

template <bool Square, typename T>
void spatial_sum_columns(const T* x, float* out, int64_t B, int64_t P, int64_t C) {
  const int64_t span = kSumVectors * kLanes;
  const int64_t groups = (C + span - 1) / span;
  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, c0 = (task % groups) * span;
      const T* base = x + b * P * C;
      float* dst = out + b * C;
      if (c0 + span <= C) {
        vec total[kSumVectors] = {};
        for (int64_t p0 = 0; p0 < P; p0 += kSumRun) {
          vec run[kSumVectors] = {};
          const int64_t p1 = std::min(P, p0 + kSumRun);
          for (int64_t p = p0; p < p1; ++p) {
            const T* px = base + p * C + c0;
#pragma GCC unroll 4
            for (int v = 0; v < kSumVectors; ++v) {
              const vec a = load_float(px + v * kLanes);
              run[v] += Square ? a * a : a;
            }
          }
#pragma GCC unroll 4
          for (int v = 0; v < kSumVectors; ++v) total[v] += run[v];
        }
        std::memcpy(dst + c0, total, sizeof(total));
      } else {  // the channel tail, one channel at a time
        for (int64_t c = c0; c < C; ++c) {
          float total = 0.f;
          for (int64_t p0 = 0; p0 < P; p0 += kSumRun) {
            float run = 0.f;
            for (int64_t p = p0; p < std::min(P, p0 + kSumRun); ++p) {
              const float a = to_float(base[p * C + c]);
              run += Square ? a * a : a;
            }
            total += run;
          }
          dst[c] = total;
        }
      }
    }
  });
}

template <bool Square, typename T>
void spatial_sum_rows(const T* x, float* out, int64_t B, int64_t P, int64_t C) {
  const int64_t vectors = C / kLanes;
  int64_t spans = 1;  // channel spans per image, each a whole number of vectors (the last also takes the tail)
  while (B * spans < kSumTasksPerThread * at::get_num_threads() && 2 * spans <= vectors) spans *= 2;
  at::parallel_for(0, B * spans, 1, [&](int64_t begin, int64_t end) {
    Buffer run(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / spans, span = task % spans;
      const int64_t v0 = vectors * span / spans, v1 = vectors * (span + 1) / spans;
      const int64_t c0 = v0 * kLanes, cv = v1 * kLanes, c1 = span + 1 == spans ? C : cv;
      const T* base = x + b * P * C;
      float* total = out + b * C;
      std::fill(total + c0, total + c1, 0.f);
      for (int64_t p0 = 0; p0 < P; p0 += kSumRun) {
        std::fill(run.data() + c0, run.data() + c1, 0.f);
        const int64_t p1 = std::min(P, p0 + kSumRun);
        for (int64_t p = p0; p < p1; ++p) {
          const T* px = base + p * C;
          for (int64_t c = c0; c < cv; c += kLanes) {
            const vec a = load_float(px + c);
            store(run.data() + c, load(run.data() + c) + (Square ? a * a : a));
          }
          for (int64_t c = cv; c < c1; ++c) {  // the channel tail, one channel at a time
            const float a = to_float(px[c]);
            run[c] += Square ? a * a : a;
          }
        }
        for (int64_t c = c0; c < c1; ++c) total[c] += run[c];
      }
    }
  });
}

template <bool Square, typename T>
void spatial_sum_impl(const T* x, float* out, int64_t B, int64_t P, int64_t C) {
  if (B * P * C * static_cast<int64_t>(sizeof(T)) >= kSumRowsFromBytes)
    spatial_sum_rows<Square>(x, out, B, P, C);
  else
    spatial_sum_columns<Square>(x, out, B, P, C);
}

// the sums over the P pixels of x (B, P, C), float32 or bfloat16, squared or not, into out (B, C) float32
template <bool Square>
void spatial_sum(const torch::Tensor& x, float* out, int64_t B, int64_t P, int64_t C) {
  if (x.scalar_type() == torch::kBFloat16)
    spatial_sum_impl<Square>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), out, B, P, C);
  else
    spatial_sum_impl<Square>(x.data_ptr<float>(), out, B, P, C);
}

bool float_or_bfloat16(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}

// (B, H, W, C) float32 -> (B, 1, 1, C): the sum over H and W of x squared
torch::Tensor spatial_square_sum(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4,
              "spatial_square_sum: a float32 CPU map (B, H, W, C) expected");
  auto xc = x.contiguous();
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  auto out = torch::empty({B, 1, 1, C}, x.options());
  {
    pybind11::gil_scoped_release release;
    spatial_sum<true>(xc, out.data_ptr<float>(), B, P, C);
  }
  return out;
}

// GRN's per-sample channel factor (B, 1, 1, C) of a float32 or bfloat16 map x (B, H, W, C), in float32 arithmetic:
// with g = sqrt(sum over H and W of x squared), gamma * g / (mean over C of g + 1e-6) + 1, the sum of squares in one
// pass (spatial_sum) and the rest on the (B, C) sums, one call in place of a dozen small ones (at batch 1 their
// dispatch costs more than their arithmetic). The channel mean is summed in double.
torch::Tensor grn_scale(torch::Tensor x, torch::Tensor gamma) {
  TORCH_CHECK(x.device().is_cpu() && float_or_bfloat16(x) && x.dim() == 4,
              "grn_scale: a float32 or bfloat16 CPU map (B, H, W, C) expected");
  TORCH_CHECK(float_or_bfloat16(gamma) && gamma.numel() == x.size(3),
              "grn_scale: a float32 or bfloat16 gamma with one value per channel expected");
  auto xc = x.contiguous();
  auto gc = gamma.detach().to(torch::kFloat32).contiguous();
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  auto out = torch::empty({B, 1, 1, C}, x.options().dtype(torch::kFloat32));
  {
    pybind11::gil_scoped_release release;
    float* s = out.data_ptr<float>();
    const float* g = gc.data_ptr<float>();
    spatial_sum<true>(xc, s, B, P, C);
    for (int64_t b = 0; b < B; ++b) {
      float* row = s + b * C;
      double total = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        row[c] = std::sqrt(row[c]);
        total += row[c];
      }
      const float denominator = static_cast<float>(total / static_cast<double>(C)) + 1e-6f;
      for (int64_t c = 0; c < C; ++c) row[c] = g[c] * (row[c] / denominator) + 1.f;
    }
  }
  // in the dtype gamma * N + 1 has in PyTorch's type promotion
  return out.to(at::promote_types(x.scalar_type(), gamma.scalar_type()));
}

// sum_i a[i] * b[i] over n floats, 16 lanes at a time
inline float dot(const float* a, const float* b, int64_t n) {
  vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Squeeze-and-excitation's channel factor (B, C, 1, 1) of a float32 or bfloat16 map x (B, C, H, W), best laid out
// channels-last (float32 arithmetic, one rounding at the end):
// sigmoid(W_up relu(W_down mean_HW(x) + b_down) + b_up), with W_down (R, C) and W_up (C, R). One call where PyTorch
// runs six small ops (a mean, two matrix-vector products, ReLU, sigmoid); at batch 1 their dispatch costs more than
// their arithmetic.
torch::Tensor se_scale(torch::Tensor x, torch::Tensor w_down, torch::Tensor b_down, torch::Tensor w_up,
                       torch::Tensor b_up) {
  TORCH_CHECK(x.device().is_cpu() && float_or_bfloat16(x) && x.dim() == 4,
              "se_scale: a float32 or bfloat16 CPU map (B, C, H, W) expected");
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), R = w_down.size(0);
  for (const auto& t : {w_down, b_down, w_up, b_up})
    TORCH_CHECK(float_or_bfloat16(t) && t.device().is_cpu(), "se_scale: float32 or bfloat16 CPU weights expected");
  TORCH_CHECK(w_down.numel() == R * C && b_down.numel() == R && w_up.numel() == C * R && b_up.numel() == C,
              "se_scale: weights (R, C), (R), (C, R), (C) expected for a map of C channels");
  auto xl = x.permute({0, 2, 3, 1}).contiguous();
  auto wd = w_down.detach().to(torch::kFloat32).contiguous(), bd = b_down.detach().to(torch::kFloat32).contiguous();
  auto wu = w_up.detach().to(torch::kFloat32).contiguous(), bu = b_up.detach().to(torch::kFloat32).contiguous();
  auto out = torch::empty({B, C, 1, 1}, x.options().dtype(torch::kFloat32));
  {
    pybind11::gil_scoped_release release;
    float* o = out.data_ptr<float>();
    spatial_sum<false>(xl, o, B, P, C);
    const float* pd = wd.data_ptr<float>();
    const float* pbd = bd.data_ptr<float>();
    const float* pu = wu.data_ptr<float>();
    const float* pbu = bu.data_ptr<float>();
    const float inv = 1.f / static_cast<float>(std::max<int64_t>(P, 1));
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Buffer mean(C), hidden(R);
      for (int64_t b = begin; b < end; ++b) {
        float* row = o + b * C;
        for (int64_t c = 0; c < C; ++c) mean[c] = row[c] * inv;
        for (int64_t r = 0; r < R; ++r) hidden[r] = std::max(0.f, pbd[r] + dot(pd + r * C, mean.data(), C));
        for (int64_t c = 0; c < C; ++c) row[c] = 1.f / (1.f + std::exp(-(pbu[c] + dot(pu + c * R, hidden.data(), R))));
      }
    });
  }
  // in the dtype of the 1x1 convolutions' outputs (float32 arithmetic, one rounding)
  return out.to(at::promote_types(x.scalar_type(), w_up.scalar_type()));
}

// ---------------------------------------------------------------------------------------------------------------------
// LayerNorm over the channels of a channels-last map (B, H, W, C), optionally followed by the exact (erf) GELU: the
// stem's and the downsampling layers' norms at inference. PyTorch's layer_norm works one pixel's C values at a time,
// which for the stem's few channels (20 to 64) costs more than the memory traffic (6.4 ms on a 16 MiB map of 20
// channels at batch 16, 2 cores), and the GELU after it is another pass over the map.
//
// Here 16 pixels at a time: their 16 C values, contiguous, are exactly C vectors. Each pixel's sum is gathered from
// the vectors' lanes that belong to it into an accumulator of its own (masked where a vector holds two pixels), the
// 16 accumulators are folded into one vector of the 16 pixels' sums by four rounds of permutations, and the mean, the
// variance (of the differences from the mean, a second pass) and 1 / sqrt(var + eps) are then one vector each. The
// normalisation, the affine and the GELU run on the C vectors, each lane picking its pixel's statistics by a
// permutation and its channel's weight and bias from tables made once per call.

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// e^x for x <= 0: 2^k e^r with k = x / ln 2 rounded and |r| <= ln 2 / 2, e^r by its Taylor series to degree 7
// (relative error below 1e-8 there); x is clamped at -87 (e^-87 ~ 1.6e-38, still a normal float), where the one use
// below, erf's tail, multiplies it into a value that no longer changes the result.
inline vec exp_nonpositive(vec x) {
  const vec lowest = vec{} - 87.f;
  x = x < lowest ? lowest : x;
  const ivec k = __builtin_convertvector(x * 1.44269504f - 0.5f, ivec);  // rounds toward zero: ceil of x / ln 2 - 0.5
  const vec kf = __builtin_convertvector(k, vec);
  const vec r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4, the first exact
  vec p = r * (1.f / 5040) + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const ivec bits = (k + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// erf by Abramowitz and Stegun 7.1.26 (absolute error at most 1.5e-7): 1 - t (a1 + t (a2 + ... a5 t)) e^(-x^2) with
// t = 1 / (1 + p |x|), the sign of x restored
inline vec erf_approx(vec x) {
  uvec bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uvec sign = bits & 0x80000000u;
  const uvec magnitude_bits = bits & 0x7fffffffu;
  vec a;
  std::memcpy(&a, &magnitude_bits, sizeof a);
  const vec t = 1.f / (a * 0.3275911f + 1.f);
  vec poly = t * 1.061405429f - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const vec y = 1.f - poly * t * exp_nonpositive(-(a * a));
  uvec ybits;
  std::memcpy(&ybits, &y, sizeof ybits);
  ybits |= sign;
  vec out;
  std::memcpy(&out, &ybits, sizeof out);
  return out;
}

inline vec gelu_vec(vec x) { return 0.5f * x * (1.f + erf_approx(x * 0.70710678118654752f)); }
inline float gelu_scalar(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

// 1 / sqrt(v + eps), lane by lane (vectorised: the kernels are built without errno for math functions)
inline vec inverse_sqrt(vec v, float eps) {
  float a[kLanes];
  std::memcpy(a, &v, sizeof a);
  for (int l = 0; l < kLanes; ++l) a[l] = 1.f / std::sqrt(a[l] + eps);
  std::memcpy(&v, a, sizeof v);
  return v;
}

inline void store_vec(float* p, vec v) { store(p, v); }
inline void store_vec(uint16_t* p, vec v) { *reinterpret_cast<hvec*>(p) = to_bfloat16(v); }
inline void store_one(float* p, float v) { *p = v; }
inline void store_one(uint16_t* p, float v) { *p = to_bfloat16(vec{} + v)[0]; }

// The accumulator that pixel p's partial sums go to: the folds below leave accumulator i's total in lane
// bit_reverse(i), so pixel p's ends in lane p.
constexpr int kBitReverse[kLanes] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// lanes i..i+half-1 of a and of b into one vector's halves, added to the other lanes of each
inline vec fold(vec a, vec b, ivec first, ivec second) {
  return __builtin_shuffle(a, b, first) + __builtin_shuffle(a, b, second);
}

// the 16 accumulators' totals as one vector (accumulator i's in lane bit_reverse(i))
inline vec fold_sums(vec* acc) {
  const ivec h1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const ivec h2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const ivec h3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const ivec h4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  vec a[8];
  for (int i = 0; i < 8; ++i) a[i] = fold(acc[2 * i], acc[2 * i + 1], h1, h1 + 8);
  for (int i = 0; i < 4; ++i) a[i] = fold(a[2 * i], a[2 * i + 1], h2, h2 + 4);
  for (int i = 0; i < 2; ++i) a[i] = fold(a[2 * i], a[2 * i + 1], h3, h3 + 2);
  return fold(a[0], a[1], h4, h4 + 1);
}

// Where the lanes of the C vectors of 16 pixels' channels-last values belong: vector j's lane l is channel
// (16 j + l) % C of pixel (16 j + l) / C; `first`/`last` are the first and last pixel a vector holds.
struct PixelLanes {
  explicit PixelLanes(int64_t C) : pixel(C), first(C), last(C) {
    for (int64_t j = 0; j < C; ++j) {
      for (int l = 0; l < kLanes; ++l) pixel[j][l] = static_cast<int32_t>((j * kLanes + l) / C);
      first[j] = pixel[j][0];
      last[j] = pixel[j][kLanes - 1];
    }
  }
  // the lanes of the vectors f(0) .. f(C - 1) into the accumulators of the pixels they belong to; the vectors that
  // hold one pixel alone are summed in registers first (two running sums, so consecutive adds do not wait on each
  // other), the others added lane-masked
  template <typename F>
  void accumulate(vec* acc, F f) const {
    const int64_t C = static_cast<int64_t>(pixel.size());
    vec run[2] = {};
    int32_t current = 0;
    for (int64_t j = 0; j < C; ++j) {
      const vec v = f(j);
      if (first[j] == last[j]) {
        if (first[j] != current) {
          acc[kBitReverse[current]] += run[0] + run[1];
          run[0] = run[1] = vec{};
          current = first[j];
        }
        run[j & 1] += v;
        continue;
      }
      acc[kBitReverse[current]] += run[0] + run[1];
      run[0] = run[1] = vec{};
      for (int32_t p = first[j]; p <= last[j]; ++p) acc[kBitReverse[p]] += pixel[j] == p ? v : vec{};
      current = last[j];
    }
    acc[kBitReverse[current]] += run[0] + run[1];
  }
  std::vector<ivec> pixel;
  std::vector<int32_t> first, last;
};

// the mean of one pixel's C values and 1 / sqrt(their variance + eps), for the pixels past the last group of 16
template <typename T>
void pixel_moments(const T* x, int64_t C, float eps, float& mean, float& rstd) {
  float sum = 0.f;
  for (int64_t c = 0; c < C; ++c) sum += to_float(x[c]);
  const float m = sum / static_cast<float>(C);
  float squares = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float d = to_float(x[c]) - m;
    squares += d * d;
  }
  mean = m;
  rstd = 1.f / std::sqrt(squares / static_cast<float>(C) + eps);
}

// The moments of 16 pixels of 17 to 128 float32 channels each, pixel by pixel with each pixel's values in registers
// (AVX-512 only): the accumulators of PixelLanes::accumulate, indexed by pixel, live in memory, which made a
// LayerNorm over 20 channels take as long as one over 40. Measured on 2 cores (AMD EPYC), batch 16, in alternation
// with the accumulators: LayerNorm alone 2.7-3.2x faster at 20 channels (112x112: 0.9 against 2.4-3.3 ms), 1.6-1.9x
// at 40, 1.5-1.6x from 64 to 128; with the GELU after it 1.6-2.1x at 20, 1.2-1.4x from 40 to 128. False where it
// does not apply (other channel counts, bfloat16, builds without AVX-512).
constexpr int kMomentLanes = 8;  // vectors of a pixel's channels kept in registers: up to 128 channels

template <typename T>
inline bool narrow_moments(const T* x, int64_t C, float eps, vec& mean, vec& rstd) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (C <= kLanes || C > kMomentLanes * kLanes) return false;
    const int vectors = static_cast<int>((C + kLanes - 1) / kLanes);
    const __mmask16 rest = static_cast<__mmask16>((1u << (C - (vectors - 1) * kLanes)) - 1);
    const float inverse = 1.f / static_cast<float>(C);
    alignas(64) float means[kLanes], variances[kLanes];
    __m512 row[kMomentLanes];
    for (int p = 0; p < kLanes; ++p) {
      const float* q = x + p * C;
      __m512 total = _mm512_setzero_ps();
      for (int j = 0; j < vectors; ++j) {
        row[j] = j + 1 < vectors ? _mm512_loadu_ps(q + j * kLanes) : _mm512_maskz_loadu_ps(rest, q + j * kLanes);
        total = _mm512_add_ps(total, row[j]);
      }
      const float m = _mm512_reduce_add_ps(total) * inverse;
      const __m512 mv = _mm512_set1_ps(m);
      __m512 squares = _mm512_setzero_ps();
      for (int j = 0; j < vectors; ++j) {
        const __m512 d = j + 1 < vectors ? _mm512_sub_ps(row[j], mv) : _mm512_maskz_sub_ps(rest, row[j], mv);
        squares = _mm512_fmadd_ps(d, d, squares);
      }
      means[p] = m;
      variances[p] = _mm512_reduce_add_ps(squares) * inverse;
    }
    std::memcpy(&mean, means, sizeof mean);
    vec v;
    std::memcpy(&v, variances, sizeof v);
    rstd = inverse_sqrt(v, eps);
    return true;
  }
#endif
  return false;
}

constexpr int64_t kNormBlocksPerTask = 16;

template <bool Gelu, typename T>
void layer_norm_impl(const T* x, const float* weight, const float* bias, T* out, int64_t rows, int64_t C, float eps) {
  const PixelLanes lanes(C);
  // channel (16 j + l) % C's weight and bias at 16 j + l, for j up to `period` (C / 16 where C is a multiple of 16:
  // each pixel then starts a vector, and the tables stay small; else C)
  const int64_t period = C % kLanes == 0 ? C / kLanes : C;
  Buffer wtab(period * kLanes), btab(period * kLanes);
  for (int64_t e = 0; e < period * kLanes; ++e) {
    wtab[e] = weight[e % C];
    btab[e] = bias[e % C];
  }
  const float count = static_cast<float>(C);
  const int64_t blocks = rows / kLanes;
  at::parallel_for(0, blocks, kNormBlocksPerTask, [&](int64_t begin, int64_t end) {
    vec acc[kLanes];
    for (int64_t block = begin; block < end; ++block) {
      const T* src = x + block * kLanes * C;
      T* dst = out + block * kLanes * C;
      vec mean, rstd;
      if (!narrow_moments(src, C, eps, mean, rstd)) {
        for (auto& a : acc) a = vec{};
        lanes.accumulate(acc, [&](int64_t j) { return load_float(src + j * kLanes); });
        mean = fold_sums(acc) / count;
        for (auto& a : acc) a = vec{};
        lanes.accumulate(acc, [&](int64_t j) {
          const vec d = load_float(src + j * kLanes) - __builtin_shuffle(mean, lanes.pixel[j]);
          return d * d;
        });
        rstd = inverse_sqrt(fold_sums(acc) / count, eps);
      }
      for (int64_t j = 0, t = 0; j < C; ++j, t = t + 1 == period ? 0 : t + 1) {
        const ivec p = lanes.pixel[j];
        vec y = (load_float(src + j * kLanes) - __builtin_shuffle(mean, p)) * __builtin_shuffle(rstd, p) *
                    load(wtab.data() + t * kLanes) + load(btab.data() + t * kLanes);
        if (Gelu) y = gelu_vec(y);
        store_vec(dst + j * kLanes, y);
      }
    }
  });
  for (int64_t p = blocks * kLanes; p < rows; ++p) {  // the last rows % 16 pixels, one value at a time
    float m, r;
    pixel_moments(x + p * C, C, eps, m, r);
    for (int64_t c = 0; c < C; ++c) {
      const float y = (to_float(x[p * C + c]) - m) * r * weight[c] + bias[c];
      store_one(out + p * C + c, Gelu ? gelu_scalar(y) : y);
    }
  }
}

// LayerNorm over the channels of x (B, C, H, W), float32 or bfloat16, best channels-last (else it is copied), with
// a weight and a bias of C values, then the exact GELU where `gelu`: the same shape, channels-last, in x's dtype
// (float32 arithmetic, one rounding)
torch::Tensor layer_norm_channels_last(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, double eps,
                                       bool gelu) {
  TORCH_CHECK(x.device().is_cpu() && float_or_bfloat16(x) && x.dim() == 4,
              "layer_norm_channels_last: a float32 or bfloat16 CPU map (B, C, H, W) expected");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(float_or_bfloat16(weight) && float_or_bfloat16(bias) && weight.numel() == C && bias.numel() == C,
              "layer_norm_channels_last: a float32 or bfloat16 weight and bias of one value per channel expected");
  auto xl = x.permute({0, 2, 3, 1}).contiguous();
  auto w = weight.detach().to(torch::kFloat32).contiguous(), b = bias.detach().to(torch::kFloat32).contiguous();
  auto y = torch::empty({B, H, W, C}, x.options());
  if (y.numel() > 0) {
    pybind11::gil_scoped_release release;
    const int64_t rows = B * H * W;
    const float e = static_cast<float>(eps);
    const float* pw = w.data_ptr<float>();
    const float* pb = b.data_ptr<float>();
    if (x.scalar_type() == torch::kBFloat16) {
      auto* src = reinterpret_cast<const uint16_t*>(xl.data_ptr<at::BFloat16>());
      auto* dst = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
      if (gelu) layer_norm_impl<true>(src, pw, pb, dst, rows, C, e);
      else layer_norm_impl<false>(src, pw, pb, dst, rows, C, e);
    } else if (gelu) {
      layer_norm_impl<true>(xl.data_ptr<float>(), pw, pb, y.data_ptr<float>(), rows, C, e);
    } else {
      layer_norm_impl<false>(xl.data_ptr<float>(), pw, pb, y.data_ptr<float>(), rows, C, e);
    }
  }
  return y.permute({0, 3, 1, 2});
}

// ---------------------------------------------------------------------------------------------------------------------
// A per-sample channel factor applied in place: x (B, P, C) in memory, float32 or bfloat16, times s (B, C) in float32
// (one rounding for bfloat16, as PyTorch's multiply of two bfloat16 tensors rounds). GRN's and SE's factors at
// inference. PyTorch's broadcasting multiply of a bfloat16 (B, H, W, C) map by a (B, 1, 1, C) factor took 2.6 ms
// where this takes 1.9 (56x56x320, batch 16, 2 cores, Intel Xeon); in float32 the two take the same time.
constexpr int64_t kScaleGrain = 1 << 15;  // at least this many elements per task

// A sample's P * C values are read as one run, against its factors repeated over the least common multiple of C and
// the vector width (C itself where C fills whole vectors; 80 for A's 40 channels), so that every load and store is a
// whole vector but at the sample's end.
// p[0..16) *= f[0..16) (float32 in registers as rvecs; bfloat16 through float32 and rounded once)
inline void scale_lanes(float* p, const float* f) { rstore(p, rload(p) * rload(f)); }
inline void scale_lanes(uint16_t* p, const float* f) { store_vec(p, load_float(p) * load(f)); }

template <typename T>
void channel_scale_impl(T* x, const float* s, int64_t B, int64_t P, int64_t C) {
  const int64_t period = C / std::gcd(C, static_cast<int64_t>(kLanes)) * kLanes;
  const int64_t total = P * C, periods = (total + period - 1) / period;
  at::parallel_for(0, B * periods, std::max<int64_t>(1, kScaleGrain / period), [&](int64_t begin, int64_t end) {
    Buffer pattern(period == C ? 1 : period);  // where the period is C, the sample's own factors are the pattern
    int64_t filled = -1;
    const float* f = nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / periods, k = task % periods;
      if (b != filled) {
        if (period == C) {
          f = s + b * C;
        } else {
          for (int64_t i = 0; i < period; ++i) pattern[i] = s[b * C + i % C];
          f = pattern.data();
        }
        filled = b;
      }
      T* run = x + b * total + k * period;
      const int64_t n = std::min(period, total - k * period);
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) scale_lanes(run + i, f + i);
      for (; i < n; ++i) store_one(run + i, to_float(run[i]) * f[i]);
    }
  });
}

// x (B, H, W, C) contiguous, float32 or bfloat16, times scale ((B, 1, 1, C) or any shape of B * C values, rounded to
// x's dtype first, as x.mul_(scale.to(x.dtype)) would use it), in place; returns x
torch::Tensor channel_scale_(torch::Tensor x, torch::Tensor scale) {
  TORCH_CHECK(x.device().is_cpu() && float_or_bfloat16(x) && x.dim() == 4 && x.is_contiguous(),
              "channel_scale_: a contiguous float32 or bfloat16 CPU map (B, H, W, C) expected");
  const int64_t B = x.size(0), P = x.size(1) * x.size(2), C = x.size(3);
  TORCH_CHECK(scale.device().is_cpu() && scale.is_floating_point() && scale.numel() == B * C,
              "channel_scale_: a floating factor of B * C values expected, got ", scale.numel(), " for ", B * C);
  auto sf = scale.detach().to(x.scalar_type()).to(torch::kFloat32).contiguous();
  {
    pybind11::gil_scoped_release release;
    if (x.scalar_type() == torch::kBFloat16)
      channel_scale_impl(reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()), sf.data_ptr<float>(), B, P, C);
    else
      channel_scale_impl(x.data_ptr<float>(), sf.data_ptr<float>(), B, P, C);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------------------------------
// A Linear with few outputs (N <= 48), float32, AVX-512 builds only: out (M, N) = h (M, K) @ W^T + bias (+ residual),
// with W given as narrow_weight packs it, (K, 48) zero-padded. UniRepLKNet-A's first-stage Linear2 (160 -> 40) runs
// oneDNN's kernels at about half the matmul rate: 40 outputs fill two and a half 16-float vectors. Here a block of
// kNarrowRows rows keeps its outputs in 3 x kNarrowRows registers (40 of every 48 lanes used), each input value is
// broadcast once against the three weight vectors of its row of W (the whole of W stays in the L1 cache), and the
// next block's rows are prefetched while this block runs. Measured on 2 cores (AMD EPYC, AVX-512), M = 16 x 56 x 56,
// in alternation with oneDNN's Linear and its residual post-op: 160 -> 40 in 3.9 against 6.0 ms, 320 -> 40 in 7.4
// against 10.4; at M = 3136 0.22 against 0.29 ms.
constexpr int kNarrowRows = 6;
constexpr int64_t kNarrowWidth = 48;

#ifdef __AVX512F__
// acc[r] += sum over k < length of x[r * stride + k] * w[k] (a row of 48 packed outputs) for R rows, prefetching the
// floats from `next` on (the next block's) along the way
template <int R, bool kPrefetch>
inline void narrow_product(__m512 (&acc)[R][3], const float* x, int64_t stride, int64_t length, const float* w,
                           const float* next, int64_t next_floats) {
  const int64_t lines = (next_floats + 15) / 16;
  for (int64_t k = 0; k < length; ++k) {
    if (kPrefetch)
      for (int64_t l = k * lines / length; l < (k + 1) * lines / length; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(next + l * 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_load_ps(w + k * kNarrowWidth), w1 = _mm512_load_ps(w + k * kNarrowWidth + 16),
                 w2 = _mm512_load_ps(w + k * kNarrowWidth + 32);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(x[r * stride + k]);
      acc[r][0] = _mm512_fmadd_ps(v, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(v, w2, acc[r][2]);
    }
  }
}

template <int R, bool kPrefetch>
inline void narrow_rows(const float* h, int64_t K, const float* w, const __m512* bias, const float* residual,
                        float* out, int64_t N, const __mmask16* masks) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = bias[j];
  narrow_product<R, kPrefetch>(acc, h, K, K, w, h + R * K, R * K);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) {
      if (!masks[j]) continue;
      __m512 v = acc[r][j];
      if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], residual + r * N + 16 * j));
      _mm512_mask_storeu_ps(out + r * N + 16 * j, masks[j], v);
    }
}
#endif

bool narrow_linear_supported() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// weight (N, K) float32 with N <= 48 -> (K, 48) float32, 64-byte aligned rows, zeros past N
torch::Tensor narrow_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(0) <= kNarrowWidth,
              "narrow_weight: a (N, K) weight with 1 <= N <= ", kNarrowWidth, " expected");
  auto packed = torch::zeros({weight.size(1), kNarrowWidth}, weight.options().dtype(torch::kFloat32));
  packed.narrow(1, 0, weight.size(0)).copy_(weight.detach().t());
  return packed;
}

// a vector of N values (a bias, a LayerNorm's weight or bias), where given, as float32 in the first N of 48 floats
// (the rest left as they are: zeros)
void narrow_padded(const c10::optional<torch::Tensor>& values, int64_t N, float* padded, const char* what) {
  if (!values.has_value() || !values->defined()) return;
  auto v = values->detach().to(torch::kFloat32).contiguous();
  TORCH_CHECK(v.numel() == N, what, " of N values expected");
  std::copy(v.data_ptr<float>(), v.data_ptr<float>() + N, padded);
}

#ifdef __AVX512F__
// the lanes of N outputs in each of the three 16-float vectors of a row, and the padded bias in those vectors
inline void narrow_lanes(int64_t N, const float* padded_bias, __mmask16 (&masks)[3], __m512 (&bias)[3]) {
  for (int j = 0; j < 3; ++j) {
    masks[j] = static_cast<__mmask16>((1u << std::clamp<int64_t>(N - 16 * j, 0, 16)) - 1);
    bias[j] = _mm512_load_ps(padded_bias + 16 * j);
  }
}
#endif

// h (..., K) contiguous float32; packed as narrow_weight gives it; bias (N) float32 or none; residual (..., N)
// contiguous float32 or none; input_scale (S, K) or none: the input's channels times a factor per sample, the rows
// split into S samples of equal count (GRN's factor, applied to S copies of the packed weight instead of the map);
// returns (..., N) float32
torch::Tensor narrow_linear(torch::Tensor h, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> input_scale,
                            int64_t N) {
  TORCH_CHECK(narrow_linear_supported(), "narrow_linear: this build has no AVX-512");
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == torch::kFloat32 && h.dim() >= 1 && h.is_contiguous(),
              "narrow_linear: a contiguous float32 CPU input expected");
  const int64_t K = h.size(-1);
  const int64_t M = c10::multiply_integers(h.sizes().begin(), h.sizes().end() - 1);  // rows (K may be 0)
  TORCH_CHECK(N >= 1 && N <= kNarrowWidth && packed.scalar_type() == torch::kFloat32 && packed.is_contiguous()
                  && packed.dim() == 2 && packed.size(0) == K && packed.size(1) == kNarrowWidth,
              "narrow_linear: a packed (K, 48) float32 weight and 1 <= N <= 48 expected");
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = N;
  auto out = torch::empty(shape, h.options());
  alignas(64) float padded[kNarrowWidth] = {};
  narrow_padded(bias, N, padded, "narrow_linear: a bias");
  const float* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->scalar_type() == torch::kFloat32 && residual->is_contiguous() && residual->numel() == M * N,
                "narrow_linear: a contiguous float32 residual of the output's size expected");
    res = residual->data_ptr<float>();
  }
#ifdef __AVX512F__
  __mmask16 masks[3];
  __m512 bias_vectors[3];
  narrow_lanes(N, padded, masks, bias_vectors);
  int64_t samples = 1;
  torch::Tensor weights = packed;
  if (input_scale.has_value() && input_scale->defined()) {
    samples = input_scale->size(0);
    TORCH_CHECK(input_scale->dim() == 2 && input_scale->size(1) == K && samples >= 1 && M % samples == 0,
                "narrow_linear: an input scale (S, K) whose S samples split the rows evenly expected");
    weights = (packed.unsqueeze(0) * input_scale->detach().to(torch::kFloat32).unsqueeze(-1)).contiguous();
  }
  const int64_t rows = M / samples, blocks = rows / kNarrowRows, tail = rows % kNarrowRows;
  const int64_t tasks = blocks + (tail ? 1 : 0);  // per sample: its whole blocks, then its last rows
  const float* x = h.data_ptr<float>();
  const float* w0 = weights.data_ptr<float>();
  float* y = out.data_ptr<float>();
  {
    pybind11::gil_scoped_release release;
    at::parallel_for(0, samples * tasks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t sample = t / tasks, i = t % tasks;
        const float* w = w0 + sample * K * kNarrowWidth;
        const int64_t m = sample * rows + i * kNarrowRows;
        if (i < blocks) {
          narrow_rows<kNarrowRows, true>(x + m * K, K, w, bias_vectors, res ? res + m * N : nullptr, y + m * N, N,
                                         masks);
        } else {
          for (int64_t r = m; r < m + tail; ++r)
            narrow_rows<1, false>(x + r * K, K, w, bias_vectors, res ? res + r * N : nullptr, y + r * N, N, masks);
        }
      }
    });
  }
#endif
  return out;
}

// ---------------------------------------------------------------------------------------------------------------------
// A 3x3 stride-2 convolution with padding 1 and few outputs (N <= 48), float32, AVX-512 builds only, on a
// channels-last map, with the LayerNorm over its N outputs in the same pass: UniRepLKNet-A's second stem convolution
// (20 -> 40 channels at 112x112 -> 56x56), where oneDNN's convolution runs at about half the matmul rate. An output
// pixel reads three input rows, each a contiguous run of 3 x Cin values (channels-last), so a block of
// kNarrowRows pixels of one output row is kNarrowRows rows of a narrow matrix product with K = 9 x Cin, the pixels
// 2 x Cin values apart; the image's left and right edges (and the top row) drop the taps that fall in the padding.
// The weight is given as conv_weight packs it: (9 x Cin, 48), in (ky, kx, ci) order, zero-padded.
struct Segment {
  const float* x;  // the first pixel's first input value of this kernel row
  int64_t k0;      // the weight row of that value
  int64_t length;  // contiguous values read per pixel
};

#ifdef __AVX512F__
template <int R>
inline void conv_pixels(const Segment* segments, int count, int64_t pixel_stride, const float* w, const __m512* bias,
                        const float* ln_weight, const float* ln_bias, float eps, float* out, int64_t N,
                        const __mmask16* masks) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = bias[j];
  for (int s = 0; s < count; ++s)  // each kernel row's run of values; the next block's values of it prefetched
    narrow_product<R, (R > 1)>(acc, segments[s].x, pixel_stride, segments[s].length,
                               w + segments[s].k0 * kNarrowWidth, segments[s].x + R * pixel_stride, R * pixel_stride);
  const float inverse_n = 1.f / static_cast<float>(N);
  for (int r = 0; r < R; ++r) {
    if (ln_weight) {  // the lanes past N hold zeros (zero weights and bias there)
      const __m512 mean = _mm512_set1_ps(
          _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), acc[r][2])) * inverse_n);
      __m512 squares = _mm512_setzero_ps();
      for (int j = 0; j < 3; ++j) {
        acc[r][j] = _mm512_maskz_sub_ps(masks[j], acc[r][j], mean);
        squares = _mm512_fmadd_ps(acc[r][j], acc[r][j], squares);
      }
      const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) * inverse_n + eps));
      for (int j = 0; j < 3; ++j)
        acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(acc[r][j], rstd), _mm512_load_ps(ln_weight + 16 * j),
                                    _mm512_load_ps(ln_bias + 16 * j));
    }
    for (int j = 0; j < 3; ++j)
      if (masks[j]) _mm512_mask_storeu_ps(out + r * N + 16 * j, masks[j], acc[r][j]);
  }
}
#endif

// weight (N, Cin, 3, 3) float32 with N <= 48 -> (9 x Cin, 48), rows in (ky, kx, ci) order, zeros past N
torch::Tensor narrow_conv_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.size(0) >= 1
                  && weight.size(0) <= kNarrowWidth,
              "narrow_conv_weight: a (N, Cin, 3, 3) weight with 1 <= N <= ", kNarrowWidth, " expected");
  return narrow_weight(weight.detach().permute({0, 2, 3, 1}).reshape({weight.size(0), -1}));
}

// x (B, Cin, H, W) float32 with channels-last memory; packed as narrow_conv_weight gives it; bias (N) or none;
// ln_weight and ln_bias (N) or none (no LayerNorm); returns (B, N, Ho, Wo) with channels-last memory
torch::Tensor narrow_conv3x3_s2(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                                c10::optional<torch::Tensor> ln_weight, c10::optional<torch::Tensor> ln_bias,
                                double eps, int64_t N) {
  TORCH_CHECK(narrow_linear_supported(), "narrow_conv3x3_s2: this build has no AVX-512");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4
                  && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "narrow_conv3x3_s2: a channels-last float32 CPU map (B, Cin, H, W) expected");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= 1 && W >= 1, "narrow_conv3x3_s2: a map of at least 1x1 pixels expected, got ", H, "x", W);
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  TORCH_CHECK(N >= 1 && N <= kNarrowWidth && packed.scalar_type() == torch::kFloat32 && packed.is_contiguous()
                  && packed.dim() == 2 && packed.size(0) == 9 * C && packed.size(1) == kNarrowWidth,
              "narrow_conv3x3_s2: a packed (9 x Cin, 48) float32 weight and 1 <= N <= 48 expected");
  const bool norm = ln_weight.has_value() && ln_weight->defined();
  TORCH_CHECK(!norm || (ln_bias.has_value() && ln_bias->defined() && ln_weight->numel() == N && ln_bias->numel() == N),
              "narrow_conv3x3_s2: a LayerNorm weight and bias of N values expected");
  auto out = torch::empty({B, N, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  alignas(64) float padded[3][kNarrowWidth] = {};  // bias, LayerNorm weight, LayerNorm bias
  narrow_padded(bias, N, padded[0], "narrow_conv3x3_s2: a bias");
  if (norm) {
    narrow_padded(ln_weight, N, padded[1], "narrow_conv3x3_s2: a LayerNorm weight");
    narrow_padded(ln_bias, N, padded[2], "narrow_conv3x3_s2: a LayerNorm bias");
  }
#ifdef __AVX512F__
  __mmask16 masks[3];
  __m512 bias_vectors[3];
  narrow_lanes(N, padded[0], masks, bias_vectors);
  const float* xp = x.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const float* gamma = norm ? padded[1] : nullptr;
  const float* beta = norm ? padded[2] : nullptr;
  const float e = static_cast<float>(eps);
  {
    pybind11::gil_scoped_release release;
    at::parallel_for(0, B * Ho, 1, [&](int64_t begin, int64_t end) {
      Segment segments[3];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Ho, oy = task % Ho;
        float* row_out = y + task * Wo * N;
        // the pixels of this output row whose three taps of every kernel row lie inside the image
        const int64_t first = 1, last = std::min(Wo - 1, (W - 2) / 2);  // interior: 1 <= ox <= last
        auto run = [&](int64_t ox, int64_t kx0, int64_t kx1, auto block) {
          int count = 0;
          for (int64_t ky = 0; ky < 3; ++ky) {
            const int64_t iy = 2 * oy - 1 + ky;
            if (iy < 0 || iy >= H) continue;
            segments[count++] = {xp + ((b * H + iy) * W + 2 * ox - 1 + kx0) * C, (ky * 3 + kx0) * C,
                                 (kx1 - kx0) * C};
          }
          block(segments, count, row_out + ox * N);
        };
        auto one = [&](const Segment* s, int count, float* o) {
          conv_pixels<1>(s, count, 2 * C, w, bias_vectors, gamma, beta, e, o, N, masks);
        };
        auto many = [&](const Segment* s, int count, float* o) {
          conv_pixels<kNarrowRows>(s, count, 2 * C, w, bias_vectors, gamma, beta, e, o, N, masks);
        };
        for (int64_t ox = 0; ox < Wo; ++ox) {
          if (ox >= first && ox <= last) {
            if (ox + kNarrowRows - 1 <= last) {
              run(ox, 0, 3, many);
              ox += kNarrowRows - 1;
            } else {
              run(ox, 0, 3, one);
            }
            continue;
          }
          const int64_t kx0 = ox == 0 ? 1 : 0, kx1 = std::min<int64_t>(3, W - (2 * ox - 1));
          run(ox, kx0, kx1, one);
        }
      }
    });
  }
#endif
  return out;
}

// x (B, C, H, W) in float32 or bfloat16 on the CPU, an odd kernel size K, dilation >= 1
void check(const torch::Tensor& x, int64_t K, int64_t dilation) {
  TORCH_CHECK(dilation >= 1, "depthwise_cpu: dilation must be at least 1");
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "depthwise_cpu: float32 or bfloat16 CPU input expected");
  TORCH_CHECK(x.dim() == 4 && K % 2 == 1, "depthwise_cpu: x (B, C, H, W) and an odd kernel size K expected");
}

// The weight (C, 1, K, K) as the kernels read it: (Cp / 16, K, K, 16) float32, 16-channel blocks of the K x K taps,
// zeros past channel C
torch::Tensor blocked_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "depthwise_cpu: weight (C, 1, K, K) expected");
  const int64_t C = weight.size(0), K = weight.size(2), Cp = round_up(C, kLanes);
  auto taps = weight.detach().to(torch::kFloat32).reshape({C, K * K});
  if (Cp != C) taps = torch::constant_pad_nd(taps, {0, 0, 0, Cp - C});
  return taps.view({Cp / kLanes, kLanes, K * K}).permute({0, 2, 1}).contiguous().view({Cp / kLanes, K, K, kLanes});
}

// (B, C, H, W) -> the same shape, channels-last memory, with the weight as blocked_weight gives it (inference keeps
// it between calls)
torch::Tensor forward_blocked(torch::Tensor x, torch::Tensor blocked, c10::optional<torch::Tensor> bias,
                              int64_t dilation) {
  TORCH_CHECK(blocked.dim() == 4 && blocked.scalar_type() == torch::kFloat32 && blocked.is_contiguous() &&
                  blocked.size(1) == blocked.size(2) && blocked.size(3) == kLanes,
              "depthwise_cpu: a blocked weight (Cp / 16, K, K, 16) of float32, contiguous, expected");
  TORCH_CHECK(x.dim() == 4 && blocked.size(0) == round_up(x.size(1), kLanes) / kLanes,
              "depthwise_cpu: the weight's channels differ from x's (B, C, H, W)");
  const int64_t K = blocked.size(1);
  check(x, K, dilation);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto xl = x.permute({0, 2, 3, 1}).contiguous();
  torch::Tensor bl;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == C, "depthwise_cpu: the bias needs one value per channel");
    bl = bias->detach().to(torch::kFloat32).contiguous();
  }
  auto y = torch::empty({B, H, W, C}, x.options());
  const float* bp = bl.defined() ? bl.data_ptr<float>() : nullptr;
  {
    pybind11::gil_scoped_release release;
    if (x.scalar_type() == torch::kBFloat16) {
      forward_impl(reinterpret_cast<const uint16_t*>(xl.data_ptr<at::BFloat16>()), blocked.data_ptr<float>(), bp,
                   reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), B, H, W, C, K, dilation);
    } else {
      forward_impl(xl.data_ptr<float>(), blocked.data_ptr<float>(), bp, y.data_ptr<float>(), B, H, W, C, K,
                   dilation);
    }
  }
  return y.permute({0, 3, 1, 2});
}

// (B, C, H, W) -> the same shape, channels-last memory, for a weight (C, 1, K, K)
torch::Tensor forward(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, int64_t dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1),
              "depthwise_cpu: weight (C, 1, K, K) expected for x (B, C, H, W)");
  return forward_blocked(x, blocked_weight(weight), bias, dilation);
}

// dL/dweight (C, 1, K, K) of forward(x, weight) given dL/dy
torch::Tensor weight_grad(torch::Tensor x, torch::Tensor grad_output, int64_t K, int64_t dilation) {
  check(x, K, dilation);
  TORCH_CHECK(grad_output.sizes() == x.sizes(), "depthwise_cpu: grad_output must have the input's shape");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto xl = x.permute({0, 2, 3, 1}).contiguous();
  auto gl = grad_output.to(x.scalar_type()).permute({0, 2, 3, 1}).contiguous();
  auto dw = torch::empty({K * K, C}, x.options().dtype(torch::kFloat32));
  {
    pybind11::gil_scoped_release release;
    if (x.scalar_type() == torch::kBFloat16) {
      weight_grad_impl(reinterpret_cast<const uint16_t*>(xl.data_ptr<at::BFloat16>()),
                       reinterpret_cast<const uint16_t*>(gl.data_ptr<at::BFloat16>()), dw.data_ptr<float>(), B, H, W,
                       C, K, dilation);
    } else {
      weight_grad_impl(xl.data_ptr<float>(), gl.data_ptr<float>(), dw.data_ptr<float>(), B, H, W, C, K, dilation);
    }
  }
  return dw.t().reshape({C, 1, K, K});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "depthwise convolution, channels-last float32 or bfloat16 (stride 1, same padding)");
  m.def("weight_grad", &weight_grad, "weight gradient (float32) of the depthwise convolution");
  m.def("blocked_weight", &blocked_weight, "a (C, 1, K, K) depthwise weight as the kernels read it");
  m.def("forward_blocked", &forward_blocked, "forward with the weight as blocked_weight gives it");
  m.def("se_scale", &se_scale, "squeeze-and-excitation's channel factor (B, C, 1, 1), float32 or bfloat16 maps");
  m.def("grn_scale", &grn_scale, "GRN's channel factor gamma * N + 1 (B, 1, 1, C) of a (B, H, W, C) map");
  m.def("layer_norm_channels_last", &layer_norm_channels_last,
        "LayerNorm over the channels of a channels-last (B, C, H, W) map, then GELU where asked");
  m.def("channel_scale_", &channel_scale_, "a (B, H, W, C) map times a per-sample channel factor, in place");
  m.def("spatial_square_sum", &spatial_square_sum, "sum over H and W of a (B, H, W, C) float32 map squared");
  m.def("narrow_linear_supported", &narrow_linear_supported, "whether narrow_linear is built (AVX-512)");
  m.def("narrow_weight", &narrow_weight, "a (N, K) Linear weight, N <= 48, as narrow_linear reads it");
  m.def("narrow_linear", &narrow_linear,
        "a float32 Linear with N <= 48 outputs, its bias, a residual add and a per-sample input scale");
  m.def("narrow_conv_weight", &narrow_conv_weight, "a (N, Cin, 3, 3) weight, N <= 48, as narrow_conv3x3_s2 reads it");
  m.def("narrow_conv3x3_s2", &narrow_conv3x3_s2,
        "a float32 3x3 stride-2 convolution (padding 1) with N <= 48 outputs, then LayerNorm over them where given");
}
