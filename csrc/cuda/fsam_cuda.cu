// Multi-tensor CUDA kernels of SPEC.md §6 behind the C API of fsam/capi.h.
//
// Multi-tensor apply in the manner of apex / PyTorch, with two differences:
// - the tensor list lives in device memory (a record table plus a chunk table
//   of first-tile indices, built and cached by the Python side), so one launch
//   covers any number of tensors and a steady-state step copies nothing;
// - blocks walk the tiles in a grid-stride loop (grid = SMs x blocks/SM, not
//   capped by a kernel-argument table), each tile finding its tensor by a
//   binary search of the chunk table; all indexing is int64 (tensors over
//   2^31 elements).
// The squared norm is reduced in two deterministic stages kept on the device:
// one double partial per tile (fixed per-thread order and reduction tree),
// then one block sums the partials in tile order and adds to the double *out. The
// perturbation kernel reads N², grad_scale and found_inf through pointers:
// no host synchronisation anywhere.
//
// Build: nvcc --fmad=false (no FMA contraction: the same rounding as the CPU
// kernels and the reference), sm_80 and sm_90 plus PTX (setup.py).
// setup.py also builds this file for the host with FSAM_CUDA_EMULATE defined
// (g++, fsam/cuda_emu.h: fibers for threads, real barriers and shuffles) into
// libfsam_cuda_emu.so, which the tests run on CPU tensors; that build uses
// smaller blocks and tiles (below) so small tensors span several tiles and
// the grid-stride loops wrap. Nothing else differs.
#include "fsam/capi.h"
#include "fsam/math.h"
#include "fsam/tables.h"

#if defined(FSAM_CUDA_EMULATE)
#include "fsam/cuda_emu.h"
#else
#include <cuda_runtime.h>
// FSAM_LAUNCH(kernel, grid, block, smem, stream)(args...): a kernel launch,
// spelled as a macro so that the emulated host build can provide it.
#define FSAM_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

#include <cstdio>
#include <string>

namespace {

using fsam::AdamWCoef;
using fsam::bf16_t;
using fsam::half_t;

#if defined(FSAM_CUDA_EMULATE)
constexpr int kBlock = 128;        // 4 warps: the cross-warp stage of block_sum runs
constexpr int kILP = 4;
constexpr int64_t kTile = 2048;    // elements per tile: 16 per thread, 4 ILP rounds
#else
constexpr int kBlock = 512;
constexpr int kILP = 4;
constexpr int64_t kTile = 32768;   // elements per tile: 64 per thread
#endif
constexpr int kBlocksPerSM = 2;    // grid: as many blocks as can be resident
constexpr int kMinBlocks = 2;      // launch bounds: <= 64 registers per thread
constexpr int kMaxDevices = 64;

thread_local std::string g_error;

int fail(const std::string& msg) {
  g_error = msg;
  return 1;
}

int use_device(int device) {
  int cur = -1;
  if (cudaGetDevice(&cur) == cudaSuccess && cur == device) return 0;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return fail(std::string("cudaSetDevice(") + std::to_string(device) + "): " + cudaGetErrorString(e));
  }
  return 0;
}

int check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(std::string(op) + ": " + cudaGetErrorString(e));
  return 0;
}

int max_blocks() {
  static int cache[kMaxDevices] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132 * kBlocksPerSM;
  if (dev < kMaxDevices && cache[dev]) return cache[dev];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    sms = 132;
  const int v = sms * kBlocksPerSM;
  if (dev < kMaxDevices) cache[dev] = v;
  return v;
}

unsigned grid_for(int64_t n_tiles) {
  const int64_t cap = max_blocks();
  int64_t g = n_tiles < cap ? n_tiles : cap;
  return (unsigned)(g < 1 ? 1 : g);
}

using fsam::Work;

// elements in flight per thread: fewer for double (register pressure)
template <class W> struct Ilp { static constexpr int value = kILP; };
template <> struct Ilp<double> { static constexpr int value = 2; };

// The tensor owning `tile`: the i with cs[i] <= tile < cs[i + 1] (empty
// tensors own no tile and are never selected).
__device__ __forceinline__ int64_t find_tensor(const int64_t* __restrict__ cs, int64_t n,
                                               int64_t tile) {
  int64_t lo = 0, hi = n;  // cs[lo] <= tile < cs[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cs[mid] <= tile) lo = mid; else hi = mid;
  }
  return lo;
}

struct TileRef {
  int64_t tensor;
  int64_t begin;
  int64_t len;
};

__device__ __forceinline__ TileRef locate(const fsam_tensor_t* __restrict__ t,
                                          const int64_t* __restrict__ cs, int64_t n,
                                          int64_t tile) {
  TileRef r;
  r.tensor = find_tensor(cs, n, tile);
  r.begin = (tile - cs[r.tensor]) * kTile;
  const int64_t rest = t[r.tensor].numel - r.begin;
  r.len = rest < kTile ? rest : kTile;
  return r;
}

// FSAM_DISPATCH_PG (fsam/tables.h): the (param/state dtype, grad dtype) pairs.

// Per-tensor 1 - beta2^t for the preconditioned direction (0: plain direction).
__device__ __forceinline__ double precond_bc2(const fsam_tensor_t& r, int precondition,
                                              double beta2) {
  return fsam::precond_bc2(r.step, precondition != 0, beta2);
}

// Block-wide sum with a fixed tree (deterministic). All threads must call it.
__device__ __forceinline__ double block_sum(double x, double* shared) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  x = threadIdx.x < nwarps ? shared[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;  // valid in thread 0
}

// ------------------------------------------------------------------ sq_norm
template <class P, class G>
__device__ __forceinline__ void sqnorm_tile(const fsam_tensor_t& r, const TileRef& tr,
                                            bool pre, double bc2d, float gs32, double eps,
                                            double* acc) {
  using W = typename Work<P>::type;  // P is the state/working dtype here
  constexpr int ILP = Ilp<W>::value;
  const G* __restrict__ g = (const G*)r.g + tr.begin;
  const W* __restrict__ v = (const W*)r.v + tr.begin;
  const W gs = (W)gs32, bc2 = (W)bc2d, ep = (W)eps;
  for (int64_t base = 0; base < tr.len; base += (int64_t)blockDim.x * ILP) {
    W d[ILP];
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * blockDim.x;
      d[k] = 0;
      if (i < tr.len) {
        d[k] = fsam::load<W>(g, i) / gs;
        if (pre) d[k] = fsam::precond_direction<W>(d[k], v[i], bc2, ep);
      }
    }
#pragma unroll
    for (int k = 0; k < ILP; ++k) *acc += (double)(d[k] * d[k]);
  }
}

__global__ void __launch_bounds__(kBlock, kMinBlocks)
sq_norm_kernel(const fsam_tensor_t* __restrict__ t, const int64_t* __restrict__ cs, int64_t n,
               int64_t n_tiles, double* __restrict__ partials, int precondition, double beta2,
               double eps, const float* __restrict__ grad_scale) {
  __shared__ double shared[32];
  const float gs = grad_scale ? *grad_scale : 1.0f;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileRef tr = locate(t, cs, n, tile);
    const fsam_tensor_t r = t[tr.tensor];
    const double bc2 = precond_bc2(r, precondition, beta2);
    double acc = 0.0;
    FSAM_DISPATCH_PG(r.p_dtype, r.g_dtype, sqnorm_tile, r, tr, bc2 != 0.0, bc2, gs, eps, &acc);
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) partials[tile] = acc;
  }
}

// One block: the partials summed in tile order with a fixed tree; *out += total
// (double: N² is never rounded to float32 here).
__global__ void __launch_bounds__(kBlock)
sq_norm_finish_kernel(const double* __restrict__ partials, int64_t n_tiles, double* out) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n_tiles; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = *out + acc;  // float64 throughout (SPEC §1)
}

// ------------------------------------------------------------------ perturb
template <class P, class G>
__device__ __forceinline__ void perturb_tile(const fsam_tensor_t& r, const TileRef& tr,
                                             bool pre, double bc2d, float gs32, double eps,
                                             float scale32) {
  using W = typename Work<P>::type;
  constexpr int ILP = Ilp<W>::value;
  P* __restrict__ p = (P*)r.p + tr.begin;
  P* __restrict__ b = (P*)r.b + tr.begin;
  const G* __restrict__ g = (const G*)r.g + tr.begin;
  const W* __restrict__ v = (const W*)r.v + tr.begin;
  const W gs = (W)gs32, bc2 = (W)bc2d, ep = (W)eps, scale = (W)scale32;
  for (int64_t base = 0; base < tr.len; base += (int64_t)blockDim.x * ILP) {
    W d[ILP];
    P pv[ILP];
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * blockDim.x;
      if (i < tr.len) {
        pv[k] = p[i];
        d[k] = fsam::load<W>(g, i) / gs;
        if (pre) d[k] = fsam::precond_direction<W>(d[k], v[i], bc2, ep);
      }
    }
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * blockDim.x;
      if (i < tr.len) {
        b[i] = pv[k];
        fsam::store<W>(p, i, fsam::perturbed<W>(fsam::load<W>(pv, k), d[k], scale));
      }
    }
  }
}

template <class E>
__device__ __forceinline__ void copy_tile(void* dst, const void* src, const TileRef& tr) {
  E* __restrict__ d = (E*)dst + tr.begin;
  const E* __restrict__ s = (const E*)src + tr.begin;
  for (int64_t i = threadIdx.x; i < tr.len; i += blockDim.x) d[i] = s[i];
}

__device__ __forceinline__ void copy_tile_dtype(int32_t dt, void* dst, const void* src,
                                                const TileRef& tr) {
  if (dt == fsam::kF64) copy_tile<unsigned long long>(dst, src, tr);
  else if (dt == fsam::kF32) copy_tile<unsigned int>(dst, src, tr);
  else copy_tile<unsigned short>(dst, src, tr);
}

__global__ void __launch_bounds__(kBlock, kMinBlocks)
perturb_kernel(const fsam_tensor_t* __restrict__ t, const int64_t* __restrict__ cs, int64_t n,
               int64_t n_tiles, int precondition, float rho, const double* __restrict__ norm_sq,
               float norm_eps, double beta2, double eps, const float* __restrict__ grad_scale,
               float* found_inf) {
  float scale;
  const bool finite = fsam::perturb_scale(*norm_sq, rho, norm_eps, &scale);
  if (!finite && blockIdx.x == 0 && threadIdx.x == 0) *found_inf = 1.0f;
  // Every block decides alike: found_inf only changes (to 1) when N² is not finite.
  const bool skip = !finite || *(volatile float*)found_inf != 0.0f;
  const float gs = grad_scale ? *grad_scale : 1.0f;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileRef tr = locate(t, cs, n, tile);
    const fsam_tensor_t r = t[tr.tensor];
    if (skip) {
      copy_tile_dtype(r.p_dtype, r.b, r.p, tr);
      continue;
    }
    const double bc2 = precond_bc2(r, precondition, beta2);
    FSAM_DISPATCH_PG(r.p_dtype, r.g_dtype, perturb_tile, r, tr, bc2 != 0.0, bc2, gs, eps, scale);
  }
}

// ------------------------------------------------------------ restore_adamw
template <class P, class G>
__device__ __forceinline__ void adamw_tile(const fsam_tensor_t& r, const TileRef& tr,
                                           bool has_backup, bool maximize, float gs32,
                                           const AdamWCoef<double>& cd) {
  using W = typename Work<P>::type;
  constexpr int ILP = Ilp<W>::value;
  P* __restrict__ p = (P*)r.p + tr.begin;
  const P* src = has_backup ? (const P*)r.b + tr.begin : p;
  const G* __restrict__ g = (const G*)r.g + tr.begin;
  W* __restrict__ m = (W*)r.m + tr.begin;
  W* __restrict__ v = (W*)r.v + tr.begin;
  const AdamWCoef<W> c = fsam::cast_coef<W>(cd);
  const W gs = (W)gs32;
  for (int64_t base = 0; base < tr.len; base += (int64_t)blockDim.x * ILP) {
    W gv[ILP], pv[ILP], mv[ILP], vv[ILP];
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * blockDim.x;
      if (i < tr.len) {
        gv[k] = fsam::load<W>(g, i) / gs;
        if (maximize) gv[k] = -gv[k];
        pv[k] = fsam::load<W>(src, i);
        mv[k] = m[i];
        vv[k] = v[i];
      }
    }
#pragma unroll
    for (int k = 0; k < ILP; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * blockDim.x;
      if (i < tr.len) {
        fsam::adamw_update<W>(pv[k], gv[k], mv[k], vv[k], c);
        m[i] = mv[k];
        v[i] = vv[k];
        fsam::store<W>(p, i, pv[k]);
      }
    }
  }
}

__global__ void __launch_bounds__(kBlock, kMinBlocks)
restore_adamw_kernel(const fsam_tensor_t* __restrict__ t, const int64_t* __restrict__ cs,
                     int64_t n, int64_t n_tiles, int has_backup, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int maximize,
                     const float* __restrict__ grad_scale, const float* __restrict__ found_inf) {
  const bool skip = *found_inf != 0.0f;
  if (skip && !has_backup) return;
  const float gs = grad_scale ? *grad_scale : 1.0f;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileRef tr = locate(t, cs, n, tile);
    const fsam_tensor_t r = t[tr.tensor];
    if (skip) {
      copy_tile_dtype(r.p_dtype, r.p, r.b, tr);
      continue;
    }
    // t + 1 in float32 (the steps are incremented by step_increment_kernel
    // after this kernel, so every tile of a tensor reads the same old value)
    const float t_new = *r.step + 1.0f;
    const AdamWCoef<double> cd =
        fsam::adamw_coef<double>((double)t_new, lr, beta1, beta2, eps, weight_decay);
    FSAM_DISPATCH_PG(r.p_dtype, r.g_dtype, adamw_tile, r, tr, has_backup != 0, maximize != 0,
                     gs, cd);
  }
}

__global__ void step_increment_kernel(const fsam_tensor_t* __restrict__ t, int64_t n,
                                      const float* __restrict__ found_inf) {
  if (*found_inf != 0.0f) return;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) *t[i].step = *t[i].step + 1.0f;
}

// ------------------------------------------------------------------ restore
__global__ void __launch_bounds__(kBlock)
restore_kernel(const fsam_tensor_t* __restrict__ t, const int64_t* __restrict__ cs, int64_t n,
               int64_t n_tiles) {
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const TileRef tr = locate(t, cs, n, tile);
    const fsam_tensor_t r = t[tr.tensor];
    copy_tile_dtype(r.p_dtype, r.p, r.b, tr);
  }
}

}  // namespace

// ====================================================================== C API
extern "C" {

int fsam_cuda_api_version(void) { return FSAM_API_VERSION; }
const char* fsam_cuda_last_error(void) { return g_error.c_str(); }
int64_t fsam_cuda_tile_size(void) { return kTile; }

int64_t fsam_cuda_chunk_starts(const fsam_tensor_t* t, int64_t n, int64_t tile, int64_t* starts) {
  return fsam::chunk_starts(t, n, tile, starts);
}

int fsam_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error
    return 0;
  }
  return n;
}

int fsam_cuda_sq_norm(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                      int64_t n_tiles, double* partials, int precondition, double beta2,
                      double eps, const float* grad_scale, double* out, int device, void* stream) {
  if (int rc = use_device(device)) return rc;
  if (n_tiles <= 0) return 0;  // nothing to add
  cudaStream_t s = (cudaStream_t)stream;
  FSAM_LAUNCH(sq_norm_kernel, grid_for(n_tiles), kBlock, 0, s)(t, chunk_start, n, n_tiles, partials,
                                                               precondition, beta2, eps, grad_scale);
  if (int rc = check_launch("sq_norm")) return rc;
  FSAM_LAUNCH(sq_norm_finish_kernel, 1, kBlock, 0, s)(partials, n_tiles, out);
  return check_launch("sq_norm finish");
}

int fsam_cuda_perturb(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                      int64_t n_tiles, int precondition, double rho, const double* norm_sq,
                      double norm_eps, double beta2, double eps, const float* grad_scale,
                      float* found_inf, int device, void* stream) {
  if (int rc = use_device(device)) return rc;
  // launched even with no tiles: a non-finite N² must still set found_inf
  FSAM_LAUNCH(perturb_kernel, grid_for(n_tiles), kBlock, 0, (cudaStream_t)stream)(
      t, chunk_start, n, n_tiles, precondition, (float)rho, norm_sq, (float)norm_eps, beta2, eps,
      grad_scale, found_inf);
  return check_launch("perturb");
}

int fsam_cuda_restore_adamw(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                            int64_t n_tiles, int has_backup, double lr, double beta1,
                            double beta2, double eps, double weight_decay, int maximize,
                            const float* grad_scale, const float* found_inf, int device, void* stream) {
  if (int rc = use_device(device)) return rc;
  cudaStream_t s = (cudaStream_t)stream;
  if (n_tiles > 0) {
    FSAM_LAUNCH(restore_adamw_kernel, grid_for(n_tiles), kBlock, 0, s)(
        t, chunk_start, n, n_tiles, has_backup, lr, beta1, beta2, eps, weight_decay, maximize,
        grad_scale, found_inf);
    if (int rc = check_launch("restore_adamw")) return rc;
  }
  if (n > 0) {
    const unsigned blocks = (unsigned)((n + 255) / 256);
    FSAM_LAUNCH(step_increment_kernel, blocks, 256, 0, s)(t, n, found_inf);
    return check_launch("restore_adamw steps");
  }
  return 0;
}

int fsam_cuda_restore(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                      int64_t n_tiles, int device, void* stream) {
  if (int rc = use_device(device)) return rc;
  if (n_tiles <= 0) return 0;
  FSAM_LAUNCH(restore_kernel, grid_for(n_tiles), kBlock, 0, (cudaStream_t)stream)(t, chunk_start, n,
                                                                                  n_tiles);
  return check_launch("restore");
}

}  // extern "C"
