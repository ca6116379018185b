// fsam/cuda_emu.h: the part of CUDA that csrc/cuda uses, emulated on the host,
// so that the SAME kernel source runs on CPU memory behind the same C API.
//
// Built by setup.py into fsam_kernels/_lib/libfsam_cuda_emu.so:
//   g++ -x c++ -DFSAM_CUDA_EMULATE -include fsam/cuda_emu.h csrc/cuda/*.cu
// and used by the "cuda" backend on CPU tensors when FSAM_CUDA_EMULATE=1 is
// set before fsam_kernels is imported (tests; never chosen by "auto"). The
// real build (nvcc) never sees this file: fsam_cuda.cu includes it only under
// FSAM_CUDA_EMULATE, and the header refuses to compile under nvcc.
//
// Execution model (what makes indexing and synchronisation bugs show):
// - A launch runs its blocks one after another on the calling thread, in
//   blockIdx order; one launch at a time in the process. Launches are
//   synchronous: a stream is only a token, and the runtime calls below are
//   host code (cudaMemcpyAsync is a memcpy, ...).
// - The threads of a block are cooperative fibers (ucontext), each on its own
//   stack with a guard page. A fiber runs until it reaches __syncthreads() or
//   a warp-synchronous call (__shfl_down_sync, __syncwarp), or returns:
//   * __syncthreads(): one barrier per block (every call site is the same
//     barrier, as on the GPU); it opens when every thread that has not
//     returned has arrived.
//   * __shfl_down_sync(mask, v, delta): every lane publishes v, waits for the
//     other 31 lanes of its warp (a full mask is required), then reads lane
//     + delta's value (its own beyond the warp), exactly the CUDA result.
//   * Scheduling: a randomly chosen warp runs until none of its lanes can
//     go on (all at __syncthreads or returned), its lanes in a random order,
//     then another warp (a fixed-seed xorshift: the same order every run).
//     So a warp runs ahead to the next block barrier, as on the GPU, and
//     which warp goes first changes from barrier to barrier: a missing
//     barrier makes a thread read a value not yet written (read-after-write)
//     or already overwritten by a warp that ran ahead into the next phase
//     (write-after-read).
//   * A barrier that can never open (some threads at __syncthreads, others
//     in a shuffle or gone) is reported as a launch error, not a hang.
// - __shared__ variables are static storage in one linker section, filled
//   with 0xFF bytes (NaN for floating point, -1 for integers) before each
//   block: reading shared memory that the block has not written gives NaN.
// - threadIdx / blockIdx / blockDim / gridDim read the current fiber and
//   block. Errors (bad launch configuration, deadlock, unsupported use) are
//   returned by cudaGetLastError() like real launch errors.
// What it does not model: concurrency inside a segment between barriers
// (data races on the same word), memory spaces (device pointers are host
// pointers), timing, and the last ulp of device math functions (host libm).
#pragma once

#if !defined(FSAM_CUDA_EMULATE) || defined(__CUDACC__)
#error "fsam/cuda_emu.h is only for the host (emulated) build of csrc/cuda"
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("fsam_emu_shared")))

#ifndef FSAM_CUDA_EMU_SMS
#define FSAM_CUDA_EMU_SMS 2   // multiprocessors the emulated device reports
#endif

// ------------------------------------------------------------ runtime types
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

constexpr int warpSize = 32;

// Bounds of the __shared__ section, defined by the linker (weak: absent when
// a translation unit declares no shared memory).
extern "C" char __start_fsam_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_fsam_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace fsam_emu {
namespace detail {

// ------------------------------------------------------------ errors
inline thread_local cudaError_t g_last_error = cudaSuccess;
inline thread_local std::string g_last_message;

inline cudaError_t set_error(cudaError_t e, const std::string& msg) {
  g_last_error = e;
  g_last_message = "fsam cuda emulation: " + msg;
  return e;
}

// ------------------------------------------------------------ fibers
enum State : int { kReady, kAtSync, kAtWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0, lane = 0, warp = 0;
  State state = kReady;
  unsigned shfl_seq = 0;  // warp-synchronous calls made (double-buffer parity)
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<int> warp_live;      // lanes of each warp not returned yet
  std::vector<int> warp_waiting;   // lanes of each warp in a warp-synchronous call
  std::vector<uint64_t> shfl;      // [2][warps][32] published shuffle values
  int live = 0, at_sync = 0, warps = 0;
  uint64_t sync_epoch = 0;         // __syncthreads barriers opened so far
  ucontext_t scheduler;
  void (*invoke)(void*) = nullptr;
  void* body = nullptr;
  const char* kernel = "";
  std::string error;               // set: abandon the launch
};

inline thread_local Fiber* g_fiber = nullptr;
inline thread_local Block* g_block = nullptr;
inline thread_local dim3 g_block_idx, g_block_dim, g_grid_dim;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Fiber stacks (mmap'd, a PROT_NONE guard page below each), reused by every
// launch; only touched under launch_mutex().
constexpr size_t kStackBytes = size_t(256) << 10;
inline std::vector<char*>& stacks() {
  static std::vector<char*> s;
  return s;
}
inline char* stack(size_t i) {
  std::vector<char*>& s = stacks();
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  while (s.size() <= i) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(m, page, PROT_NONE);
    s.push_back((char*)m + page);
  }
  return s[i];
}

// Deterministic pseudo-random schedule (xorshift64*, fixed seed).
inline uint64_t next_random() {
  static uint64_t state = 0x9E3779B97F4A7C15ull;
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1Dull;
}

inline void yield_to_scheduler() {
  Fiber* f = g_fiber;
  swapcontext(&f->ctx, &g_block->scheduler);
  __asm__ __volatile__("" ::: "memory");
}

inline void release_sync(Block* b) {
  for (Fiber& f : b->fibers)
    if (f.state == kAtSync) f.state = kReady;
  b->at_sync = 0;
  ++b->sync_epoch;
}

inline void release_warp(Block* b, int w) {
  for (int l = 0; l < 32; ++l) {
    Fiber& f = b->fibers[(size_t)w * 32 + l];
    if (f.state == kAtWarp) f.state = kReady;
  }
  b->warp_waiting[w] = 0;
}

inline void fail_block(Block* b, const std::string& msg) {
  if (b->error.empty()) b->error = msg;
}

// __syncthreads(): wait until every thread of the block that has not
// returned is here; always yields, so the scheduler picks the order after it.
inline void sync_block() {
  Fiber* f = g_fiber;
  Block* b = g_block;
  __asm__ __volatile__("" ::: "memory");
  f->state = kAtSync;
  if (++b->at_sync == b->live) release_sync(b);
  yield_to_scheduler();
}

// The warp barrier of the warp-synchronous calls (full mask only).
inline void sync_warp(unsigned mask, const char* what) {
  Fiber* f = g_fiber;
  Block* b = g_block;
  if (mask != 0xFFFFFFFFu || b->fibers.size() % 32 != 0) {
    fail_block(b, std::string(what) + " with mask " + std::to_string(mask) + " in a block of " +
                      std::to_string(b->fibers.size()) +
                      " threads: only full warps and a full mask are emulated");
    yield_to_scheduler();  // never resumed: the launch is abandoned
  }
  if (b->warp_live[f->warp] != 32) {
    fail_block(b, std::string(what) + ": a lane of warp " + std::to_string(f->warp) +
                      " has returned (undefined behaviour with a full mask)");
    yield_to_scheduler();
  }
  __asm__ __volatile__("" ::: "memory");
  f->state = kAtWarp;
  if (++b->warp_waiting[f->warp] == 32) release_warp(b, f->warp);
  yield_to_scheduler();
}

inline void fiber_main() {
  Block* b = g_block;
  b->invoke(b->body);
  Fiber* f = g_fiber;
  f->state = kDone;
  --b->live;
  --b->warp_live[f->warp];
  if (b->warp_waiting[f->warp] > 0)
    fail_block(b, "a thread returned while lanes of its warp wait in a warp-synchronous call");
  if (b->at_sync > 0 && b->at_sync == b->live) release_sync(b);
  // returning resumes uc_link: the scheduler
}

inline const char* state_name(State s) {
  return s == kAtSync ? "__syncthreads" : s == kAtWarp ? "a warp-synchronous call" : "?";
}

// Runs one block to completion (or to an error in b->error).
inline void run_block(Block* b, size_t nthreads, const dim3& bdim) {
  // poison the block's shared memory: reading an unwritten word gives NaN / -1
  if (__start_fsam_emu_shared != nullptr)
    memset(__start_fsam_emu_shared, 0xFF, (size_t)(__stop_fsam_emu_shared - __start_fsam_emu_shared));
  b->fibers.assign(nthreads, Fiber());
  b->warps = (int)((nthreads + 31) / 32);
  b->warp_live.assign(b->warps, 0);
  b->warp_waiting.assign(b->warps, 0);
  b->shfl.assign((size_t)2 * b->warps * 32, 0);
  b->live = (int)nthreads;
  b->at_sync = 0;
  for (size_t i = 0; i < nthreads; ++i) {
    Fiber& f = b->fibers[i];
    f.linear = (int)i;
    f.tid = dim3((unsigned)(i % bdim.x), (unsigned)((i / bdim.x) % bdim.y),
                 (unsigned)(i / ((size_t)bdim.x * bdim.y)));
    f.lane = (int)(i % 32);
    f.warp = (int)(i / 32);
    ++b->warp_live[f.warp];
    char* st = stack(i);
    if (st == nullptr) {
      fail_block(b, "could not allocate fiber stacks");
      return;
    }
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = st;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b->scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // Schedule: pick a random warp that has a ready lane and run that warp
  // until none of its lanes is ready (all at __syncthreads, done, or the
  // block is deadlocked); its lanes in a random order each pass. A warp thus
  // runs ahead of the others up to the next block barrier, as warps do on
  // the GPU, and the warps' order differs from barrier to barrier.
  std::vector<int> warps;
  int lanes[32];
  while (b->live > 0 && b->error.empty()) {
    warps.clear();
    for (int w = 0; w < b->warps; ++w)
      for (size_t i = (size_t)w * 32; i < nthreads && i < (size_t)(w + 1) * 32; ++i)
        if (b->fibers[i].state == kReady) {
          warps.push_back(w);
          break;
        }
    if (warps.empty()) {
      int at_sync = 0, at_warp = 0;
      for (const Fiber& f : b->fibers) at_sync += f.state == kAtSync, at_warp += f.state == kAtWarp;
      fail_block(b, "deadlock: " + std::to_string(at_sync) + " threads wait at " +
                        state_name(kAtSync) + ", " + std::to_string(at_warp) + " in " +
                        state_name(kAtWarp) + ", " + std::to_string(nthreads - b->live) +
                        " returned");
      return;
    }
    const int w = warps[next_random() % warps.size()];
    const int first = w * 32;
    const int count = (int)std::min<size_t>(32, nthreads - (size_t)first);
    const uint64_t epoch = b->sync_epoch;
    // until the warp cannot go on, or a block barrier opens (then the next
    // warp to run is drawn again: not always the one that arrived last)
    for (bool ran = true; ran && b->sync_epoch == epoch;) {
      ran = false;
      for (int l = 0; l < count; ++l) lanes[l] = l;
      for (int l = count; l > 1; --l) std::swap(lanes[l - 1], lanes[next_random() % l]);
      for (int l = 0; l < count; ++l) {
        Fiber& f = b->fibers[(size_t)first + lanes[l]];
        if (f.state != kReady || b->sync_epoch != epoch) continue;
        ran = true;
        g_fiber = &f;
        swapcontext(&b->scheduler, &f.ctx);
        g_fiber = nullptr;
        if (!b->error.empty()) return;
      }
    }
  }
}

inline void launch(const char* kernel, dim3 grid, dim3 block, size_t smem,
                   void (*invoke)(void*), void* body) {
  const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              std::string(kernel) + ": invalid configuration: grid (" + std::to_string(grid.x) +
                  ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                  std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                  std::to_string(block.z) + ")");
    return;
  }
  if (smem != 0) {
    set_error(cudaErrorInvalidConfiguration,
              std::string(kernel) + ": dynamic shared memory is not emulated");
    return;
  }
  std::lock_guard<std::mutex> lk(launch_mutex());
  Block b;
  b.invoke = invoke;
  b.body = body;
  b.kernel = kernel;
  g_block = &b;
  g_grid_dim = grid;
  g_block_dim = block;
  for (unsigned z = 0; z < grid.z && b.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && b.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && b.error.empty(); ++x) {
        g_block_idx = dim3(x, y, z);
        run_block(&b, (size_t)nthreads, block);
        if (!b.error.empty())
          set_error(cudaErrorLaunchFailure, std::string(kernel) + " block (" + std::to_string(x) +
                                                ", " + std::to_string(y) + ", " +
                                                std::to_string(z) + "): " + b.error);
      }
  g_block = nullptr;
}

template <class F>
void invoke_body(void* body) {
  (*(F*)body)();
}

inline const dim3& thread_idx() { return g_fiber->tid; }

}  // namespace detail

// FSAM_LAUNCH(kernel, grid, block, smem, stream)(args...): the arguments are
// converted to the kernel's parameter types once, and every thread receives
// its own by-value copies, as on the GPU.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  const char* name;
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<P>...> args(static_cast<std::decay_t<P>>(std::forward<A>(a))...);
    void (*k)(P...) = kernel;
    auto body = [k, &args]() { std::apply(k, args); };
    detail::launch(name, grid, block, smem, &detail::invoke_body<decltype(body)>, &body);
  }
};

template <class... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t /*stream: launches are synchronous*/, const char* name) {
  return Launch<P...>{kernel, grid, block, smem, name};
}

}  // namespace fsam_emu

#define FSAM_LAUNCH(kernel, grid, block, smem, stream) \
  ::fsam_emu::make_launch(kernel, grid, block, smem, stream, #kernel)

// ------------------------------------------------------------ built-in variables
#define threadIdx (::fsam_emu::detail::thread_idx())
#define blockIdx (::fsam_emu::detail::g_block_idx)
#define blockDim (::fsam_emu::detail::g_block_dim)
#define gridDim (::fsam_emu::detail::g_grid_dim)

// ------------------------------------------------------------ device intrinsics
inline void __syncthreads() { ::fsam_emu::detail::sync_block(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  ::fsam_emu::detail::sync_warp(mask, "__syncwarp");
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "__shfl_down_sync: types of at most 8 bytes");
  using namespace ::fsam_emu::detail;
  Fiber* f = g_fiber;
  Block* b = g_block;
  uint64_t* slots = &b->shfl[((size_t)(f->shfl_seq++ & 1u) * b->warps + f->warp) * 32];
  uint64_t bits = 0;
  memcpy(&bits, &var, sizeof(T));
  slots[f->lane] = bits;
  sync_warp(mask, "__shfl_down_sync");
  const int in_segment = f->lane % width;
  if (in_segment + (int)delta >= width) return var;
  T out;
  memcpy(&out, &slots[f->lane + delta], sizeof(T));
  return out;
}

// ------------------------------------------------------------ runtime API (host code)
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::fsam_emu::detail::g_last_error;
  ::fsam_emu::detail::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::fsam_emu::detail::g_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (!::fsam_emu::detail::g_last_message.empty()) return ::fsam_emu::detail::g_last_message.c_str();
  return "fsam cuda emulation: error";
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d == 0) return cudaSuccess;
  return ::fsam_emu::detail::set_error(
      cudaErrorInvalidDevice, "device " + std::to_string(d) + ": the emulated device is 0");
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMultiProcessorCount)
    return ::fsam_emu::detail::set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: only "
                                         "cudaDevAttrMultiProcessorCount of device 0");
  *value = FSAM_CUDA_EMU_SMS;
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t = nullptr) {
  memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
