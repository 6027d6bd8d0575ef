// Few-row matrix products for CPU decoding, called from JAX through XLA's FFI.
//
//   y[r, o] = sum_i x[r, i] * w[o, i]     x: f32 (rows, in), w: f32 or bf16 (out, in)
//   y[r, o] = scale[o] * sum_i x[r, i] * q[o, i]     q: int8 (out, in), weight-only int8
//
// A decode step multiplies one to a few rows by every weight matrix, so its speed is the
// speed of reading the weights. XLA:CPU reads float32 weights this way at ~20-25 GB/s and
// has no fast bfloat16 path at all (a bf16 product ran ~10x slower than f32 here). This
// kernel reads three weight rows at a time, widening bfloat16 to float32 in registers,
// against up to eight input rows held in registers (register blocks), and prefetches the
// next three weight rows into L2 meanwhile. Work is split into chunks of output rows that
// the calling thread and XLA's intra-op pool claim from a shared counter (tasks.h).

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"
#include "tasks.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 66;  // outputs per unit of work handed to a thread
constexpr int kBlock = 3;       // weight rows (outputs) per register block
static_assert(kChunk % kBlock == 0, "a chunk is whole blocks");

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline float widen(int8_t v) { return static_cast<float>(v); }

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#endif

// Outputs [o, o + B) for input rows [r0, r0 + R), in R x B accumulators (24 of the 32
// vector registers for 8 x 3). Each loaded vector feeds B or R multiply-adds, so several
// rows stay near memory speed instead of turning load-bound: the first kernel's loop, one
// weight row against each input row in turn, ran 8 rows at ~25 GFLOP/s a core, this block
// ~95 with the weights in L2. The caller's next block is prefetched into L2 meanwhile:
// without it the B interleaved weight streams read at ~8 GB/s, with it even one input row
// is a little faster than reading one weight row at a time (benchmarks/NOTES.md, decode 12).
template <int R, int B, typename W>
void block(const float* x, const W* w, const float* scale, float* y, int64_t n_in,
           int64_t n_out, int64_t o, int64_t r0, const W* prefetch, int prefetch_rows) {
  float sums[R][B];
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  for (; i + 16 <= n_in; i += 16) {
    // The empty asm statements pin each loaded vector in a register. Without them GCC
    // folded every activation load into each multiply-add as a memory operand (27 loads
    // for 24 multiply-adds), which held the block to a third of its speed.
    __m512 wv[B];
    for (int b = 0; b < B; ++b) {
      wv[b] = load16(w + (o + b) * n_in + i);
      asm("" : "+v"(wv[b]));
    }
    for (int b = 0; b < prefetch_rows; ++b)
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + b * n_in + i), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + (r0 + r) * n_in + i);
      asm("" : "+v"(xv));
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_fmadd_ps(wv[b], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) sums[r][b] = _mm512_reduce_add_ps(acc[r][b]);
#else
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) sums[r][b] = 0.0f;
#endif
  for (; i < n_in; ++i)
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) sums[r][b] += widen(w[(o + b) * n_in + i]) * x[(r0 + r) * n_in + i];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      y[(r0 + r) * n_out + o + b] = scale ? sums[r][b] * scale[o + b] : sums[r][b];
}

// Outputs [o, o + B) for every input row, in groups of 8, 4, 2 and 1. Only the first group
// prefetches; the later ones reread a block that is still cached.
template <int B, typename W>
void all_rows(const float* x, const W* w, const float* scale, float* y, int64_t rows,
              int64_t n_in, int64_t n_out, int64_t o, const W* prefetch, int prefetch_rows) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8, prefetch_rows = 0)
    block<8, B>(x, w, scale, y, n_in, n_out, o, r, prefetch, prefetch_rows);
  for (; r + 4 <= rows; r += 4, prefetch_rows = 0)
    block<4, B>(x, w, scale, y, n_in, n_out, o, r, prefetch, prefetch_rows);
  for (; r + 2 <= rows; r += 2, prefetch_rows = 0)
    block<2, B>(x, w, scale, y, n_in, n_out, o, r, prefetch, prefetch_rows);
  if (r < rows) block<1, B>(x, w, scale, y, n_in, n_out, o, r, prefetch, prefetch_rows);
}

template <typename W>
void outputs(const float* x, const W* w, const float* scale, float* y, int64_t rows,
             int64_t n_in, int64_t n_out, int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + kBlock <= end; o += kBlock) {
    int64_t ahead = end - (o + kBlock);  // rows of the next block, within this chunk
    all_rows<kBlock>(x, w, scale, y, rows, n_in, n_out, o, w + (o + kBlock) * n_in,
                     static_cast<int>(ahead < kBlock ? ahead : kBlock));
  }
  // kChunk is a multiple of kBlock, so only the last chunk can end in one or two outputs.
  if (end - o == 2) all_rows<2>(x, w, scale, y, rows, n_in, n_out, o, w, 0);
  if (end - o == 1) all_rows<1>(x, w, scale, y, rows, n_in, n_out, o, w, 0);
}

// `scale` is null for float weights, and int8 weights' per-output scales otherwise.
template <typename W>
ffi::Error Multiply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, const W* w,
                    const float* scale, ffi::ResultBuffer<ffi::F32> y, int64_t n_out) {
  const float* xd = x.typed_data();
  float* yd = y->typed_data();
  int64_t rows = x.dimensions()[0], n_in = x.dimensions()[1];
  return gptjax_native::run_tasks(pool, (n_out + kChunk - 1) / kChunk, [&](int64_t c) {
    int64_t begin = c * kChunk;
    outputs(xd, w, scale, yd, rows, n_in, n_out, begin,
            begin + kChunk < n_out ? begin + kChunk : n_out);
  });
}

// x (rows, in), w (out, in), y (rows, out): anything else is refused, never read past.
template <typename WB, typename YB>
ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x, const WB& w, YB& y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("expected x (rows, in), w (out, in), y (rows, out)");
  return ffi::Error::Success();
}

ffi::Error MultiplyF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  if (auto bad = CheckShapes(x, w, y); bad.failure()) return bad;
  return Multiply(pool, x, w.typed_data(), static_cast<const float*>(nullptr), y,
                  w.dimensions()[0]);
}

ffi::Error MultiplyBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  if (auto bad = CheckShapes(x, w, y); bad.failure()) return bad;
  return Multiply(pool, x, reinterpret_cast<const uint16_t*>(w.typed_data()),
                  static_cast<const float*>(nullptr), y, w.dimensions()[0]);
}

ffi::Error MultiplyI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  if (auto bad = CheckShapes(x, w, y); bad.failure()) return bad;
  auto sd = scale.dimensions();
  if (sd.size() != 1 || sd[0] != w.dimensions()[0])
    return ffi::Error::InvalidArgument("expected one scale per output, (out,)");
  return Multiply(pool, x, reinterpret_cast<const int8_t*>(w.typed_data()), scale.typed_data(), y,
                  w.dimensions()[0]);
}

}  // namespace

// 1 when built with AVX-512 (the fast path); the scalar fallback is slower than XLA's dot,
// so Python does not use the kernel then.
extern "C" int gptjax_skinny_matmul_vectorized() {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxSkinnyMatmulF32, MultiplyF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxSkinnyMatmulI8, MultiplyI8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxSkinnyMatmulBF16, MultiplyBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
