// Splitting one FFI call's work over XLA:CPU's intra-op pool, for gptjax's native kernels.
//
// The calling thread and up to (pool size - 1) pool threads claim task indices from a shared
// counter, so the call never waits on a pool thread that has not started: if none starts,
// the caller runs every task itself. The caller then waits for tasks other threads claimed.

#ifndef GPTJAX_NATIVE_TASKS_H_
#define GPTJAX_NATIVE_TASKS_H_

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace gptjax_native {

struct Tasks {
  int64_t count;
  std::function<void(int64_t)> run_one;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> out_of_memory{false};

  void run() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      try {
        run_one(i);
      } catch (const std::bad_alloc&) {  // a pool thread must not throw into XLA
        out_of_memory.store(true, std::memory_order_relaxed);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs run_one(0 .. count - 1) over the pool; returns once all are done. `run_one` may hold
// references to the caller's locals: a pool thread that starts after this returns finds no
// index left and never calls it (the shared Tasks keeps the counter alive for it).
inline xla::ffi::Error run_tasks(xla::ffi::ThreadPool& pool, int64_t count,
                                 std::function<void(int64_t)> run_one) {
  auto tasks = std::make_shared<Tasks>();
  tasks->count = count;
  tasks->run_one = std::move(run_one);
  int64_t helpers = pool.num_threads() - 1;
  if (helpers > count - 1) helpers = count - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([tasks] { tasks->run(); });
  tasks->run();
  // Tasks still out are being computed right now; yield rather than spin once the wait is
  // long, in case their thread shares this core.
  for (int spins = 0; tasks->done.load(std::memory_order_acquire) < count; ++spins) {
    if (spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }
  if (tasks->out_of_memory.load(std::memory_order_relaxed))
    return xla::ffi::Error::Internal("gptjax native kernel: out of memory for its scratch");
  return xla::ffi::Error::Success();
}

}  // namespace gptjax_native

#endif  // GPTJAX_NATIVE_TASKS_H_
