// Few-row matrix products for CPU decoding, called from JAX through XLA's FFI.
//
//   y[r, o] = sum_i x[r, i] * w[o, i]     x: f32 (rows, in), w: f32 or bf16 (out, in)
//
// A decode step multiplies one to a few rows by every weight matrix, so its speed is the
// speed of reading the weights. XLA:CPU reads float32 weights this way at ~20-25 GB/s and
// has no fast bfloat16 path at all (a bf16 product ran ~10x slower than f32 here). This
// kernel streams each weight row once, widening bfloat16 to float32 in registers, and
// reuses it for every input row while it sits in L1. From three input rows on, weight rows
// are taken three at a time against up to eight input rows (register blocks), so the
// products stay near memory speed instead of turning load-bound. Work is split into
// chunks of output rows that the calling thread and XLA's intra-op pool claim from a
// shared counter, so the call never waits on a pool thread that has not started.

#include <immintrin.h>

#include <atomic>
#include <thread>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 66;          // outputs per unit of work handed to a thread
constexpr int kBlock = 3;               // weight rows per register block; kChunk is a multiple
constexpr int64_t kBlockedRows = 3;     // from this many input rows on, products use blocks

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// Output o for input rows [r0, r0 + R): the path for one or two rows, where the product is
// pure reading. The weight row is read front to back as one stream (several rows read side
// by side measured ~35% slower: the prefetcher handles a single sequential stream best;
// software prefetch only slowed it), with kUnroll independent accumulators per input row.
template <int R, typename W>
void row(const float* x, const W* w_row, float* y, int64_t n_in, int64_t n_out, int64_t o,
         int64_t r0) {
  float sums[R];
  int64_t i = 0;
#ifdef __AVX512F__
  constexpr int kUnroll = R >= 4 ? 1 : 4 / R;  // ~4-8 accumulators in flight
  __m512 acc[R][kUnroll];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < kUnroll; ++u) acc[r][u] = _mm512_setzero_ps();
  for (; i + 16 * kUnroll <= n_in; i += 16 * kUnroll) {
    for (int u = 0; u < kUnroll; ++u) {
      __m512 wv = load16(w_row + i + 16 * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (r0 + r) * n_in + i + 16 * u),
                                    acc[r][u]);
    }
  }
  for (; i + 16 <= n_in; i += 16) {
    __m512 wv = load16(w_row + i);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (r0 + r) * n_in + i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = acc[r][0];
    for (int u = 1; u < kUnroll; ++u) s = _mm512_add_ps(s, acc[r][u]);
    sums[r] = _mm512_reduce_add_ps(s);
  }
#else
  for (int r = 0; r < R; ++r) sums[r] = 0.0f;
#endif
  for (; i < n_in; ++i)
    for (int r = 0; r < R; ++r) sums[r] += widen(w_row[i]) * x[(r0 + r) * n_in + i];
  for (int r = 0; r < R; ++r) y[(r0 + r) * n_out + o] = sums[r];
}

// Several input rows: a block of kBlock weight rows times R input rows, in R x kBlock
// accumulators (24 of the 32 vector registers for R = 8). Each loaded vector then feeds
// kBlock or R multiply-adds instead of one, which is what makes batched decoding compute-
// rather than load-bound (the one-row path above ran 8 rows at ~45 GFLOP/s a core; this
// block ~95 with the weights cached). The weights of the next block are prefetched into L2
// while this one computes: without that the three interleaved streams ran at ~8 GB/s.
template <int R, typename W>
void block(const float* x, const W* w, float* y, int64_t n_in, int64_t n_out, int64_t o,
           int64_t r0, const W* prefetch, const W* prefetch_end) {
  float sums[R][kBlock];
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 acc[R][kBlock];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kBlock; ++b) acc[r][b] = _mm512_setzero_ps();
  for (; i + 16 <= n_in; i += 16) {
    __m512 wv[kBlock];
    for (int b = 0; b < kBlock; ++b) {
      wv[b] = load16(w + (o + b) * n_in + i);
      // Pin each loaded vector in a register: otherwise GCC re-reads it as a memory operand
      // of every multiply-add (R x kBlock loads a step), which halved the speed.
      asm("" : "+v"(wv[b]));
      if (prefetch != nullptr && prefetch + b * n_in + i < prefetch_end)
        _mm_prefetch(prefetch + b * n_in + i, _MM_HINT_T1);
    }
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + (r0 + r) * n_in + i);
      asm("" : "+v"(xv));
      for (int b = 0; b < kBlock; ++b) acc[r][b] = _mm512_fmadd_ps(wv[b], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kBlock; ++b) sums[r][b] = _mm512_reduce_add_ps(acc[r][b]);
#else
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kBlock; ++b) sums[r][b] = 0.0f;
#endif
  for (; i < n_in; ++i)
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < kBlock; ++b)
        sums[r][b] += widen(w[(o + b) * n_in + i]) * x[(r0 + r) * n_in + i];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kBlock; ++b) y[(r0 + r) * n_out + o + b] = sums[r][b];
}

template <typename W>
void outputs(const float* x, const W* w, float* y, int64_t rows, int64_t n_in, int64_t n_out,
             int64_t begin, int64_t end) {
  int64_t o = begin;
  if (rows >= kBlockedRows) {
    const W* chunk_end = w + end * n_in;
    for (; o + kBlock <= end; o += kBlock) {
      // Only the first row group prefetches; the others find the block in L1.
      const W* next = w + (o + kBlock) * n_in;
      int64_t r = 0;
      for (; r + 8 <= rows; r += 8, next = nullptr)
        block<8>(x, w, y, n_in, n_out, o, r, next, chunk_end);
      for (; r + 4 <= rows; r += 4, next = nullptr)
        block<4>(x, w, y, n_in, n_out, o, r, next, chunk_end);
      for (; r + 2 <= rows; r += 2, next = nullptr)
        block<2>(x, w, y, n_in, n_out, o, r, next, chunk_end);
      for (; r < rows; ++r, next = nullptr) block<1>(x, w, y, n_in, n_out, o, r, next, chunk_end);
    }
  }
  for (; o < end; ++o) {
    const W* w_row = w + o * n_in;
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) row<8>(x, w_row, y, n_in, n_out, o, r);
    for (; r + 4 <= rows; r += 4) row<4>(x, w_row, y, n_in, n_out, o, r);
    for (; r + 2 <= rows; r += 2) row<2>(x, w_row, y, n_in, n_out, o, r);
    for (; r < rows; ++r) row<1>(x, w_row, y, n_in, n_out, o, r);
  }
}

template <typename W>
struct Work {
  const float* x;
  const W* w;
  float* y;
  int64_t rows, n_in, n_out, n_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
      int64_t begin = c * kChunk;
      int64_t end = begin + kChunk < n_out ? begin + kChunk : n_out;
      outputs(x, w, y, rows, n_in, n_out, begin, end);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename W>
ffi::Error Multiply(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, const W* w,
                    ffi::ResultBuffer<ffi::F32> y, int64_t n_out) {
  auto dims = x.dimensions();
  auto work = std::make_shared<Work<W>>();
  work->x = x.typed_data();
  work->w = w;
  work->y = y->typed_data();
  work->rows = dims[0];
  work->n_in = dims[1];
  work->n_out = n_out;
  work->n_chunks = (n_out + kChunk - 1) / kChunk;
  // Helpers hold the work alive: one that starts after the caller finished finds no
  // chunk left and returns.
  int64_t helpers = pool.num_threads() - 1;
  if (helpers > work->n_chunks - 1) helpers = work->n_chunks - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->run(); });
  work->run();
  // Chunks still out are being computed right now; yield rather than spin once the wait
  // is long, in case their thread shares this core.
  for (int spins = 0; work->done.load(std::memory_order_acquire) < work->n_chunks; ++spins) {
    if (spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }
  return ffi::Error::Success();
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
  return Multiply(pool, x, w.typed_data(), y, w.dimensions()[0]);
}

ffi::Error MultiplyBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  if (auto bad = CheckShapes(x, w, y); bad.failure()) return bad;
  return Multiply(pool, x, reinterpret_cast<const uint16_t*>(w.typed_data()), y,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxSkinnyMatmulBF16, MultiplyBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
