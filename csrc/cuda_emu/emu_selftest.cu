// Self-test kernels of the CUDA emulation (fsam/cuda_emu.h): compiled only
// into the emulated library (setup.py), never by nvcc. They check that the
// emulation gives __syncthreads, warp shuffles and __shared__ memory their
// CUDA meaning, so that a missing barrier in csrc/cuda shows in the tests
// (tests/test_cuda_emulated.py calls them through ctypes).
#include "fsam/capi.h"

#include <string.h>

#include <string>

namespace {

constexpr int kMaxThreads = 1024;

// Every thread writes its index to shared memory, optionally waits at the
// barrier, then reads its right neighbour's slot (in the next warp for the
// last lane): exact with the barrier, NaN (unwritten, poisoned) for some
// thread without it.
__global__ void exchange_kernel(double* out, int sync) {
  __shared__ double slot[kMaxThreads];
  const unsigned n = blockDim.x;
  slot[threadIdx.x] = (double)threadIdx.x;
  if (sync) __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 1) % n];
}

// __shfl_down_sync by 1, 5 and 16: lane + delta's value, or the lane's own
// where lane + delta leaves the warp.
__global__ void shuffle_kernel(double* out) {
  const double v = 1000.0 * blockIdx.x + threadIdx.x;
  out[3 * threadIdx.x + 0] = __shfl_down_sync(0xffffffffu, v, 1);
  out[3 * threadIdx.x + 1] = __shfl_down_sync(0xffffffffu, v, 5);
  out[3 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, v, 16);
}

// A barrier that cannot open: warp 0 and half of warp 1 wait at
// __syncthreads, the other half of warp 1 in a shuffle that needs them.
__global__ void deadlock_kernel(double* out) {
  double v = threadIdx.x;
  if (threadIdx.x >= 32 && (threadIdx.x & 31) < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  else __syncthreads();
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" {

/* which: 0 exchange with __syncthreads, 1 exchange without, 2 shuffles
 * (out: 3 per thread), 3 deadlock (must fail). One block of `threads`
 * threads (<= 1024). Returns 0, or 1 with the launch error in msg. */
FSAM_API int fsam_cuda_emu_selftest(int which, int threads, double* out, char* msg, int msg_len) {
  if (threads < 1 || threads > kMaxThreads) return 2;
  if (which == 0 || which == 1) FSAM_LAUNCH(exchange_kernel, 1, threads, 0, nullptr)(out, which == 0);
  else if (which == 2) FSAM_LAUNCH(shuffle_kernel, 1, threads, 0, nullptr)(out);
  else FSAM_LAUNCH(deadlock_kernel, 1, threads, 0, nullptr)(out);
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return 0;
  if (msg != nullptr && msg_len > 0) {
    strncpy(msg, cudaGetErrorString(e), (size_t)msg_len - 1);
    msg[msg_len - 1] = 0;
  }
  return 1;
}

}  // extern "C"
