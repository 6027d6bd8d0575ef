// Causal self-attention for CPU training, forward and backward, called through XLA's FFI.
//
//   o = softmax(scale * q k^T + causal mask) v
//
// q, k and v come packed as the qkv projection makes them, f32 (batch, time, 3, heads, dim);
// o is (batch, time, heads, dim), and the backward returns the gradient packed like qkv, so
// XLA neither slices q, k, v out nor concatenates their gradients (~5% of the baby step).
//
// XLA:CPU runs attention's per-(batch, head) products as batched dots on one thread at
// ~40-80 GFLOP/s and the softmax, mask and heads-major transposes as separate passes
// (benchmarks/NOTES.md, train step entry 10). Here each (batch, head) is one task: the
// calling thread and XLA's intra-op pool claim tasks from a shared counter, and a task
// reads q, k, v in place (strided rows), skips every 8-row by 32-column tile wholly above
// the diagonal, and keeps its scores in a per-thread scratch. The forward saves only two
// numbers a row, the largest scaled score and 1 / the sum of exponentials; the backward
// recomputes the probabilities from them (as flash attention does from a log-sum-exp), so
// no (time x time) tensor leaves the kernel. Kept apart rather than as one log-sum-exp,
// whose float32 rounding (~1e-6 at |lse| ~ 10) would pass into every probability.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "tasks.h"

namespace ffi = xla::ffi;

namespace {

// Strides between time steps of one head and a task's (b, h) first elements, in the packed
// (batch, time, 3, heads, dim), per-head (batch, time, heads, dim) and statistics
// (batch, time, heads, 2) layouts.
struct Shape {
  int64_t batch, time, heads, dim;
  int64_t per_head_stride() const { return heads * dim; }  // also q -> k -> v in a packed row
  int64_t packed_stride() const { return 3 * heads * dim; }
  int64_t packed_at(int64_t task) const {
    return (task / heads) * time * packed_stride() + (task % heads) * dim;
  }
  int64_t per_head_at(int64_t task) const {
    return (task / heads) * time * per_head_stride() + (task % heads) * dim;
  }
  int64_t stats_at(int64_t task) const {
    return ((task / heads) * time * heads + task % heads) * 2;
  }
};

#ifdef __AVX512F__

constexpr int kRows = 8;   // rows of a register tile
constexpr int kCols = 32;  // columns of a register tile: two vectors

inline __mmask16 first(int64_t n) {  // the first n lanes (n clipped to 0..16)
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// exp(x), with x clamped to [-87, 88] (below, exp underflows float32's normal range anyway):
// x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for exp(r) (truncation
// < 1e-8 relative, under float32 rounding), times 2^n.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// A strided view: element (i, j) at data[i * rs + j * cs]. B operands and results always
// have cs == 1 (rows are loaded as vectors); an A operand may be read transposed.
struct View {
  const float* data;
  int64_t rs, cs;
};

// C[r, c] = sum_{k in [k0, k1)} A[r, k] * B[k, c] for the tile of R rows from `row` and up
// to 32 columns from `col`.
template <int R>
void tile(View a, View b, float* c, int64_t ldc, int64_t row, int64_t col, int64_t ncols,
          int64_t k0, int64_t k1) {
  __mmask16 m0 = first(ncols), m1 = first(ncols - 16);
  __m512 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  const float* arow = a.data + row * a.rs;
  for (int64_t k = k0; k < k1; ++k) {
    const float* bk = b.data + k * b.rs + col;
    __m512 b0 = _mm512_maskz_loadu_ps(m0, bk), b1 = _mm512_maskz_loadu_ps(m1, bk + 16);
    const float* ak = arow + k * a.cs;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512 x = _mm512_set1_ps(ak[r * a.rs]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + (row + r) * ldc + col;
    _mm512_mask_storeu_ps(cr, m0, acc[r][0]);
    _mm512_mask_storeu_ps(cr + 16, m1, acc[r][1]);
  }
}

template <int R = kRows>
void tile_rows(int rows, View a, View b, float* c, int64_t ldc, int64_t row, int64_t col,
               int64_t ncols, int64_t k0, int64_t k1) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(rows, a, b, c, ldc, row, col, ncols, k0, k1);
  }
  tile<R>(a, b, c, ldc, row, col, ncols, k0, k1);
}

// C = A B over rows [0, m) and columns [0, n), contracting k in [k_lo(row), k_hi(row)) for
// each 8-row block starting at `row`; columns limited to [0, n_hi(row)) (causal skipping).
template <typename KLo, typename KHi, typename NHi>
void product(View a, View b, float* c, int64_t ldc, int64_t m, KLo k_lo, KHi k_hi, NHi n_hi) {
  for (int64_t row = 0; row < m; row += kRows) {
    int rows = static_cast<int>(m - row < kRows ? m - row : kRows);
    int64_t n = n_hi(row, rows);
    for (int64_t col = 0; col < n; col += kCols)
      tile_rows(rows, a, b, c, ldc, row, col, n - col < kCols ? n - col : kCols, k_lo(row),
                k_hi(row, rows));
  }
}

// Per thread, grown as needed and kept for the process's life: about 2 T^2 floats per
// pool thread (32 MiB at T = 2048, gptjax.attention's limit for "auto").
struct Scratch {
  std::vector<float> s, p, kt, vt, top, inv;
  void fit(const Shape& sh) {
    size_t tt = size_t(sh.time) * size_t(sh.time), dt = size_t(sh.dim) * size_t(sh.time);
    if (s.size() < tt) s.resize(tt), p.resize(tt);
    if (kt.size() < dt) kt.resize(dt), vt.resize(dt);
    if (top.size() < size_t(sh.time)) top.resize(sh.time), inv.resize(sh.time);
  }
};

Scratch& scratch(const Shape& sh) {
  thread_local Scratch mine;
  mine.fit(sh);
  return mine;
}

// out (cols x rows) = x (rows x cols, rows `stride` floats apart), in 16 x 16 blocks. Row by
// row, each source row's stores went to `cols` destination rows `rows` floats apart, which
// share a few L1 sets (1 KiB apart at T = 256); perf put that loop at ~13% of the forward's
// time and ~15% of the backward's at the 10M config's shape. In blocks the kernel ran
// 1.06-1.10x faster there, and no differently at the baby config's (benchmarks/NOTES.md,
// train step entry 13). Its loads of k and v, the task's first reads of them, remain.
void transpose(const float* x, int64_t stride, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    int64_t i1 = std::min(i0 + kBlock, rows);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      int64_t j1 = std::min(j0 + kBlock, cols);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) out[j * rows + i] = x[i * stride + j];
    }
  }
}

// The keys an 8-row block of queries from `row` multiplies: [0, row + rows). Row i's own
// visible keys are [0, i]; the rest of its block's columns hold zeros once masked.
inline int64_t seen(int64_t row, int rows) { return row + rows; }
inline int64_t block_end(int64_t i, int64_t t) {
  int64_t end = (i / kRows + 1) * kRows;
  return end < t ? end : t;
}

// Unscaled q k^T over the causal tiles.
void scores(const Shape& sh, const float* q, const float* kt, float* s) {
  int64_t t = sh.time;
  product(View{q, sh.packed_stride(), 1}, View{kt, t, 1}, s, t, t,
          [](int64_t) { return int64_t(0); }, [&](int64_t, int) { return sh.dim; }, seen);
}

// p[i, j] = exp(scale s[i, j] - top[i]) inv[i] for j <= i, zero for the rest of its block.
void probabilities(int64_t t, float scale, const float* s, const float* top, const float* inv,
                   float* p) {
  __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < t; ++i) {
    int64_t width = block_end(i, t);
    __m512 shift = _mm512_set1_ps(top[i]), times = _mm512_set1_ps(inv[i]);
    for (int64_t j = 0; j < width; j += 16) {
      __mmask16 live = first(i + 1 - j), all = first(width - j);
      __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(live, s + i * t + j), sc, shift);
      _mm512_mask_storeu_ps(p + i * t + j, all,
                            _mm512_maskz_mul_ps(live, exp16(x), times));
    }
  }
}

// stats: this task's (top, inv) for its first row; rows are heads * 2 floats apart, as in
// the (batch, time, heads, 2) layout.
void forward_task(const Shape& sh, float scale, const float* qkv, float* o, float* stats) {
  int64_t t = sh.time, rs = sh.packed_stride(), next = sh.per_head_stride();
  const float *q = qkv, *k = qkv + next, *v = qkv + 2 * next;
  Scratch& w = scratch(sh);
  transpose(k, rs, t, sh.dim, w.kt.data());
  scores(sh, q, w.kt.data(), w.s.data());
  // Each row's largest score, then its exponentials, written into p as they are summed
  // (zero past the diagonal, to the end of the row's block), then scaled by 1 / sum: the
  // same operations the backward's `probabilities` repeats, so both see the same p.
  __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < t; ++i) {
    const float* si = w.s.data() + i * t;
    float* pi = w.p.data() + i * t;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j <= i; j += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, first(i + 1 - j), si + j));
    __m512 top = _mm512_set1_ps(scale * _mm512_reduce_max_ps(mx));  // scale > 0
    __m512 sum = _mm512_setzero_ps();
    int64_t width = block_end(i, t);
    for (int64_t j = 0; j < width; j += 16) {
      __mmask16 live = first(i + 1 - j), all = first(width - j);
      __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(live, si + j), sc, top);
      __m512 e = _mm512_maskz_mov_ps(live, exp16(x));
      sum = _mm512_add_ps(sum, e);
      _mm512_mask_storeu_ps(pi + j, all, e);
    }
    float inv = 1 / _mm512_reduce_add_ps(sum);
    __m512 times = _mm512_set1_ps(inv);
    for (int64_t j = 0; j <= i; j += 16) {
      __mmask16 live = first(i + 1 - j);
      _mm512_mask_storeu_ps(pi + j, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, pi + j), times));
    }
    stats[i * sh.heads * 2] = top[0];
    stats[i * sh.heads * 2 + 1] = inv;
  }
  product(View{w.p.data(), t, 1}, View{v, rs, 1}, o, next, t,
          [](int64_t) { return int64_t(0); }, seen, [&](int64_t, int) { return sh.dim; });
}

void backward_task(const Shape& sh, float scale, const float* qkv, const float* stats,
                   const float* dout, float* dqkv) {
  int64_t t = sh.time, d = sh.dim, rs = sh.packed_stride(), next = sh.per_head_stride();
  const float *q = qkv, *k = qkv + next, *v = qkv + 2 * next;
  float *dq = dqkv, *dk = dqkv + next, *dv = dqkv + 2 * next;
  Scratch& w = scratch(sh);
  float* s = w.s.data();
  float* p = w.p.data();
  transpose(k, rs, t, d, w.kt.data());
  transpose(v, rs, t, d, w.vt.data());
  for (int64_t i = 0; i < t; ++i) {
    w.top[i] = stats[i * sh.heads * 2];
    w.inv[i] = stats[i * sh.heads * 2 + 1];
  }
  scores(sh, q, w.kt.data(), s);
  probabilities(t, scale, s, w.top.data(), w.inv.data(), p);
  auto zero = [](int64_t) { return int64_t(0); };
  auto all_dim = [&](int64_t, int) { return d; };
  // dp = dout v^T (into s: the scores are spent), then ds = p (dp - sum_j p dp) scale,
  // zero above the diagonal within each block so the products below may read whole
  // blocks. The row sum is taken over these p and dp rather than as rowsum(dout * out),
  // its equal in exact arithmetic: consistent with the rounded p, it kept dq and dk about
  // 2x closer to a float64 reference, and the output need not be saved for the backward.
  product(View{dout, next, 1}, View{w.vt.data(), t, 1}, s, t, t, zero, all_dim, seen);
  __m512 sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < t; ++i) {
    int64_t width = block_end(i, t);
    float* dsi = s + i * t;
    const float* pi = p + i * t;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j <= i; j += 16) {
      __mmask16 live = first(i + 1 - j);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, pi + j),
                            _mm512_maskz_loadu_ps(live, dsi + j), acc);
    }
    __m512 row_sum = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    for (int64_t j = 0; j < width; j += 16) {
      __mmask16 live = first(i + 1 - j), all = first(width - j);
      __m512 dp = _mm512_maskz_loadu_ps(live, dsi + j);
      __m512 ds = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, pi + j),
                                              _mm512_sub_ps(dp, row_sum)), sc);
      _mm512_mask_storeu_ps(dsi + j, all, _mm512_maskz_mov_ps(live, ds));
    }
  }
  // dq = ds k over each query block's keys.
  product(View{s, t, 1}, View{k, rs, 1}, dq, rs, t, zero, seen, all_dim);
  // dk = ds^T q and dv = p^T dout: key j gathers the queries i >= j (A read transposed).
  auto from_row = [](int64_t row) { return row; };
  auto to_end = [&](int64_t, int) { return t; };
  product(View{s, 1, t}, View{q, rs, 1}, dk, rs, t, from_row, to_end, all_dim);
  product(View{p, 1, t}, View{dout, next, 1}, dv, rs, t, from_row, to_end, all_dim);
}

#endif  // __AVX512F__

// Packed (batch, time, 3, heads, dim) operands, per-head (batch, time, heads, dim) ones and
// (batch, time, heads, 2) statistics, all of one (batch, time, heads, dim).
ffi::Error check(std::initializer_list<ffi::AnyBuffer::Dimensions> packed,
                 std::initializer_list<ffi::AnyBuffer::Dimensions> per_head,
                 ffi::AnyBuffer::Dimensions stats) {
  const auto& ref = *packed.begin();
  if (ref.size() != 5 || ref[2] != 3)
    return ffi::Error::InvalidArgument("expected qkv packed as (batch, time, 3, heads, dim)");
  const int64_t want[] = {ref[0], ref[1], ref[3], ref[4]};
  for (const auto& x : packed)
    if (!std::equal(x.begin(), x.end(), ref.begin(), ref.end()))
      return ffi::Error::InvalidArgument(
          "expected equal packed (batch, time, 3, heads, dim) operands");
  for (const auto& x : per_head)
    if (!std::equal(x.begin(), x.end(), want, want + 4))
      return ffi::Error::InvalidArgument("expected (batch, time, heads, dim) to match qkv");
  const int64_t want_stats[] = {ref[0], ref[1], ref[3], 2};
  if (!std::equal(stats.begin(), stats.end(), want_stats, want_stats + 4))
    return ffi::Error::InvalidArgument("expected (batch, time, heads, 2) row statistics");
  return ffi::Error::Success();
}

Shape shape_of(const ffi::AnyBuffer::Dimensions& d) { return Shape{d[0], d[1], d[3], d[4]}; }

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, float scale,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> stats) {
  if (auto bad = check({qkv.dimensions()}, {o->dimensions()}, stats->dimensions());
      bad.failure())
    return bad;
#ifdef __AVX512F__
  Shape sh = shape_of(qkv.dimensions());
  const float* in = qkv.typed_data();
  float *out = o->typed_data(), *st = stats->typed_data();
  return gptjax_native::run_tasks(pool, sh.batch * sh.heads, [&](int64_t task) {
    forward_task(sh, scale, in + sh.packed_at(task), out + sh.per_head_at(task),
                 st + sh.stats_at(task));
  });
#else
  return ffi::Error::Internal("gptjax's attention kernel was built without AVX-512");
#endif
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> dout, float scale, ffi::ResultBuffer<ffi::F32> dqkv) {
  if (auto bad = check({qkv.dimensions(), dqkv->dimensions()}, {dout.dimensions()},
                       stats.dimensions());
      bad.failure())
    return bad;
#ifdef __AVX512F__
  Shape sh = shape_of(qkv.dimensions());
  return gptjax_native::run_tasks(pool, sh.batch * sh.heads, [&](int64_t task) {
    backward_task(sh, scale, qkv.typed_data() + sh.packed_at(task),
                  stats.typed_data() + sh.stats_at(task), dout.typed_data() + sh.per_head_at(task),
                  dqkv->typed_data() + sh.packed_at(task));
  });
#else
  return ffi::Error::Internal("gptjax's attention kernel was built without AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxCausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>());  // stats

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // stats
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d o
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d qkv
