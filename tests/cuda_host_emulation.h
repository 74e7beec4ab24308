// Host emulation of the CUDA execution model, enough to run csrc/cuda's kernels on the CPU for tests: each
// CUDA thread of a CTA is a fiber, __syncthreads is a CTA-wide barrier, and the warp collectives the
// kernels use (__shfl_xor_sync, __shfl_up_sync, __reduce_max_sync, full mask) exchange values through per-warp
// barriers. Every lane must therefore reach every barrier and collective the same number of times, exactly what the
// hardware demands: a divergent collective never completes here (the test's timeout turns that into a
// failure), and a fiber that finishes while others wait at a barrier hangs likewise.
// __shared__ variables become function statics, shared by the threads of the one CTA running at a time.
// Math is libm's (no fast-math approximations), so results match the GPU's to rounding, not bitwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include <setjmp.h>
#include <ucontext.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace hk_emu {

// One CTA at a time runs as its threads' fibers on the calling OS thread: a fiber runs until it waits at a
// barrier, then the scheduler resumes the next fiber whose barrier has opened. Cooperative and
// deterministic. A fiber starts on its own stack through makecontext/setcontext; after that every switch is
// _setjmp/_longjmp, which (unlike swapcontext) costs no signal-mask system call.
struct Barrier {
  int count = 0;
  int arrived = 0;
  long generation = 0;
};

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  std::vector<char> stack;
  bool started = false;
  bool done = false;
  long collectives = 0;                 // warp collectives this thread has entered
  const Barrier* waiting_on = nullptr;  // blocked until waiting_on->generation != waiting_generation
  long waiting_generation = 0;
};

// Collectives exchange through two buffers used alternately, so one barrier per collective suffices: a
// lane can write buffer i % 2 for collective i only after every lane passed collective i - 1's barrier,
// hence finished reading collective i - 2 from that buffer.
struct Warp {
  Barrier barrier;
  float floats[2][32];
  int ints[2][32];
};

inline dim3 thread_idx;
inline dim3 block_idx;
inline jmp_buf scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<Warp> warps;
inline Barrier cta_barrier;
inline const std::function<void()>* kernel_body = nullptr;

inline void yield() {
  if (!_setjmp(fibers[thread_idx.x].resume)) _longjmp(scheduler, 1);
}

inline void wait(Barrier& b) {
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber& me = fibers[thread_idx.x];
  me.waiting_on = &b;
  me.waiting_generation = b.generation;
  yield();
}

inline void fiber_main() {
  (*kernel_body)();
  fibers[thread_idx.x].done = true;
  _longjmp(scheduler, 1);
}

// Runs fiber t until it waits or finishes. Its own frame holds the _setjmp, so no caller's locals live
// across the jump.
[[gnu::noinline]] inline void resume(int t) {
  Fiber& f = fibers[t];
  f.waiting_on = nullptr;
  thread_idx = dim3(t, 0, 0);
  if (!_setjmp(scheduler)) {
    if (f.started) _longjmp(f.resume, 1);
    f.started = true;
    setcontext(&f.start);
  }
}

// Runs body() as every thread of every CTA of grid, one CTA at a time. Returns false on a deadlock: a pass
// over the fibers in which none could run (a collective or barrier that not every thread reaches).
inline bool launch(dim3 grid, int threads, const std::function<void()>& body) {
  constexpr size_t kStack = 256 * 1024;
  fibers.resize(threads);
  warps = std::vector<Warp>(threads / 32);
  for (auto& w : warps) w.barrier.count = 32;
  kernel_body = &body;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      cta_barrier = Barrier{threads, 0, 0};
      block_idx = dim3(bx, by, 0);
      for (Fiber& f : fibers) {
        f.stack.resize(kStack);
        f.started = f.done = false;
        f.collectives = 0;
        f.waiting_on = nullptr;
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack.data();
        f.start.uc_stack.ss_size = kStack;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_main, 0);
      }
      for (bool running = true; running;) {
        running = false;
        bool progressed = false;
        for (int t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          if (f.done) continue;
          running = true;
          if (f.waiting_on != nullptr && f.waiting_on->generation == f.waiting_generation) continue;
          progressed = true;
          resume(t);
        }
        if (running && !progressed) return false;
      }
    }
  }
  return true;
}

inline Warp& my_warp() {
  return warps[thread_idx.x / 32];
}

}  // namespace hk_emu

#define threadIdx (::hk_emu::thread_idx)
#define blockIdx (::hk_emu::block_idx)

inline void __syncthreads() {
  hk_emu::wait(hk_emu::cta_barrier);
}

inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  hk_emu::Warp& w = hk_emu::my_warp();
  const int lane = static_cast<int>(hk_emu::thread_idx.x % 32);
  float* buffer = w.floats[hk_emu::fibers[hk_emu::thread_idx.x].collectives++ % 2];
  buffer[lane] = x;
  hk_emu::wait(w.barrier);
  return buffer[lane ^ lane_mask];
}

inline int __shfl_up_sync(unsigned, int x, unsigned delta) {
  hk_emu::Warp& w = hk_emu::my_warp();
  const int lane = static_cast<int>(hk_emu::thread_idx.x % 32);
  int* buffer = w.ints[hk_emu::fibers[hk_emu::thread_idx.x].collectives++ % 2];
  buffer[lane] = x;
  hk_emu::wait(w.barrier);
  return lane >= static_cast<int>(delta) ? buffer[lane - delta] : x;
}

inline int __reduce_max_sync(unsigned, int x) {
  hk_emu::Warp& w = hk_emu::my_warp();
  const int lane = static_cast<int>(hk_emu::thread_idx.x % 32);
  int* buffer = w.ints[hk_emu::fibers[hk_emu::thread_idx.x].collectives++ % 2];
  buffer[lane] = x;
  hk_emu::wait(w.barrier);
  return *std::max_element(buffer, buffer + 32);
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

using std::max;
using std::min;
