// fsam/tables.h: the host-side pieces shared by the CPU and CUDA libraries
// (and, through the C API, by fsam_kernels/backends/native.py): the working
// type, the per-tensor coefficients in double, the supported dtype pairs and
// their dispatch, and the one chunk-table builder.
//
// Include after fsam/capi.h and fsam/math.h. Host code only, except the
// dispatch macro and the FSAM_HD helpers (callable from device code too).
#pragma once

#include <math.h>
#include <stdint.h>

#include "fsam/capi.h"
#include "fsam/math.h"

namespace fsam {

// The working (arithmetic) type of a storage type: double for double, float
// for float and the 16-bit types (SPEC §2).
template <class T> struct Work { using type = float; };
template <> struct Work<double> { using type = double; };
template <> struct Work<const double> { using type = double; };

// 1 - beta2^t of a tensor's preconditioned direction, 0 where the plain
// direction applies (not preconditioned, no step, or t < 1).
FSAM_HD double precond_bc2(const float* step, bool precondition, double beta2) {
  if (!precondition || step == nullptr) return 0.0;
  const double t = (double)*step;
  return t >= 1.0 ? bias_correction(beta2, t) : 0.0;
}

// The double coefficients of adamw_coef() rounded once to the working type W.
template <class W>
FSAM_HD AdamWCoef<W> cast_coef(const AdamWCoef<double>& c) {
  AdamWCoef<W> r;
  r.decay = (W)c.decay;
  r.lerp_w = (W)c.lerp_w;
  r.beta2 = (W)c.beta2;
  r.one_minus_beta2 = (W)c.one_minus_beta2;
  r.neg_step_size = (W)c.neg_step_size;
  r.bc2_sqrt = (W)c.bc2_sqrt;
  r.eps = (W)c.eps;
  return r;
}

// The supported (param/state dtype, grad dtype) pairs (capi.h): a 16/32-bit
// parameter with a 16/32-bit grad, a float64 parameter with a float64 grad.
FSAM_HD bool supported_pair(int32_t pd, int32_t gd) {
  if (pd == kF64) return gd == kF64;
  return (pd == kF32 || pd == kF16 || pd == kBF16) && (gd == kF32 || gd == kF16 || gd == kBF16);
}

// The chunk table of a call: starts[i] = the first chunk of tensor i, chunks
// of `chunk` elements, starts[n] = the number of chunks (n + 1 entries;
// empty tensors own no chunk). Returns starts[n]. The CPU library cuts its
// work with it (kChunk) and the CUDA launch tables are built with it
// (fsam_cuda_chunk_starts, kTile).
inline int64_t chunk_starts(const fsam_tensor_t* t, int64_t n, int64_t chunk, int64_t* starts) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    starts[i] = total;
    total += (t[i].numel + chunk - 1) / chunk;
  }
  starts[n] = total;
  return total;
}

}  // namespace fsam

// Dispatch on a supported (param/state dtype, grad dtype) pair to
// FN<P, G>(args...) (unsupported pairs: nothing; callers check supported_pair).
#define FSAM_DISPATCH_PG(PD, GD, FN, ...)                                      \
  do {                                                                         \
    switch (PD) {                                                              \
      case fsam::kF32:                                                         \
        if (GD == fsam::kF32) FN<float, float>(__VA_ARGS__);                   \
        else if (GD == fsam::kF16) FN<float, fsam::half_t>(__VA_ARGS__);       \
        else if (GD == fsam::kBF16) FN<float, fsam::bf16_t>(__VA_ARGS__);      \
        break;                                                                 \
      case fsam::kF16:                                                         \
        if (GD == fsam::kF32) FN<fsam::half_t, float>(__VA_ARGS__);            \
        else if (GD == fsam::kF16) FN<fsam::half_t, fsam::half_t>(__VA_ARGS__); \
        else if (GD == fsam::kBF16) FN<fsam::half_t, fsam::bf16_t>(__VA_ARGS__); \
        break;                                                                 \
      case fsam::kBF16:                                                        \
        if (GD == fsam::kF32) FN<fsam::bf16_t, float>(__VA_ARGS__);            \
        else if (GD == fsam::kF16) FN<fsam::bf16_t, fsam::half_t>(__VA_ARGS__); \
        else if (GD == fsam::kBF16) FN<fsam::bf16_t, fsam::bf16_t>(__VA_ARGS__); \
        break;                                                                 \
      case fsam::kF64:                                                         \
        if (GD == fsam::kF64) FN<double, double>(__VA_ARGS__);                 \
        break;                                                                 \
      default: break;                                                          \
    }                                                                          \
  } while (0)
