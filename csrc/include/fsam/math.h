// fsam/math.h: the per-element math of SPEC.md, shared by the CPU (C++17) and
// CUDA kernels so that the two cannot drift apart.
//
// Everything here is header-only and `__host__ __device__ inline` under nvcc.
// The operation order mirrors the reference backend (which itself follows
// torch.optim.adam._single_tensor_adam): lerp for exp_avg, mul + addcmul for
// exp_avg_sq, sqrt(v) / sqrt(bc2) + eps, addcdiv. Both builds must keep IEEE
// semantics: no fast-math, no FMA contraction (-ffp-contract=off on the CPU,
// --fmad=false under nvcc), so CPU and CUDA results are bitwise equal.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define FSAM_HD __host__ __device__ __forceinline__
#else
#define FSAM_HD inline __attribute__((always_inline))
#endif

namespace fsam {

// dtype codes of the C API (capi.h: FSAM_F32 ...)
enum Dtype : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// 16-bit storage types: plain bit containers, converted explicitly.
struct half_t { uint16_t x; };
struct bf16_t { uint16_t x; };

FSAM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}
FSAM_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}

// ---- bfloat16 <-> float (round to nearest even; NaN stays a quiet NaN) ----
FSAM_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(((uint32_t)h) << 16); }
FSAM_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
  return (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rounded);
}

// ---- IEEE half <-> float, branch-free (vectorises on the CPU) ----
// half -> float: normal numbers by rebiasing the exponent with one float
// multiply, subnormals through a magic-number subtraction.
FSAM_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  __half_raw r; r.x = h; return __half2float(__half(r));
#else
  const uint32_t w = ((uint32_t)h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;                       // drops the sign
  const float normal = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormal = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f32_bits(denormal) : f32_bits(normal);
  return f32_from_bits(sign | bits);
#endif
}
// float -> half, round to nearest even, overflow to inf, NaN to quiet NaN:
// scale so that the float adder performs the rounding at the half's precision.
FSAM_HD uint16_t f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  __half_raw r = __half_raw(__float2half_rn(f)); return r.x;
#else
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mant_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mant_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

// ---- typed load / store into the working type W (float or double) ----
template <class W> FSAM_HD W to_w(float x) { return (W)x; }
template <class W> FSAM_HD W load(const float* p, int64_t i) { return (W)p[i]; }
template <class W> FSAM_HD W load(const double* p, int64_t i) { return (W)p[i]; }
template <class W> FSAM_HD W load(const half_t* p, int64_t i) { return (W)f16_to_f32(p[i].x); }
template <class W> FSAM_HD W load(const bf16_t* p, int64_t i) { return (W)bf16_to_f32(p[i].x); }

template <class W> FSAM_HD void store(float* p, int64_t i, W x) { p[i] = (float)x; }
template <class W> FSAM_HD void store(double* p, int64_t i, W x) { p[i] = (double)x; }
template <class W> FSAM_HD void store(half_t* p, int64_t i, W x) { p[i].x = f32_to_f16((float)x); }
template <class W> FSAM_HD void store(bf16_t* p, int64_t i, W x) { p[i].x = f32_to_bf16((float)x); }

// bitwise element copy (the 16-bit structs by their bits: vectorises on the CPU)
FSAM_HD void copy_elem(float* d, const float* s, int64_t i) { d[i] = s[i]; }
FSAM_HD void copy_elem(double* d, const double* s, int64_t i) { d[i] = s[i]; }
FSAM_HD void copy_elem(half_t* d, const half_t* s, int64_t i) { d[i].x = s[i].x; }
FSAM_HD void copy_elem(bf16_t* d, const bf16_t* s, int64_t i) { d[i].x = s[i].x; }

FSAM_HD float sqrt_w(float x) { return sqrtf(x); }
FSAM_HD double sqrt_w(double x) { return sqrt(x); }
FSAM_HD bool finite_w(float x) { return (f32_bits(x) & 0x7F800000u) != 0x7F800000u; }
FSAM_HD bool finite_w(double x) { return x - x == 0.0; }

// ---- SPEC §1: the ascent direction and the perturbation ----
// Plain: d = g / s. Preconditioned (t >= 1): d = (g/s) / (sqrt(v / bc2) + eps),
// bc2 = 1 - beta2^t computed in double on the host/device and rounded to W.
// The grad is divided by the scale (true division, as the reference does);
// with no grad_scale the kernels pass s = 1, which is exact.
template <class W>
FSAM_HD W precond_direction(W g, W v, W bc2, W eps) {
  return g / (sqrt_w(v / bc2) + eps);
}

// The scale rho / (sqrt(N²) + norm_eps) of SPEC §1: the float64 N² rounded
// once to float32, the scale formed from it in float32. Returns false when
// N² (the float64 value) is not finite: the step is skipped. (A finite N²
// beyond float32's range rounds to inf and gives scale 0.)
FSAM_HD bool perturb_scale(double norm_sq, float rho, float norm_eps, float* scale) {
  const float n2 = (float)norm_sq;
  *scale = rho / (sqrtf(n2) + norm_eps);
  return finite_w(norm_sq);
}

// p + scale * d, formed in W and rounded once to the parameter dtype by store().
template <class W>
FSAM_HD W perturbed(W p, W d, W scale) { return p + d * scale; }

// 1 - beta^t, in double (SPEC §1, §3: the bias corrections are computed in
// float64 and rounded once to W where they are used).
FSAM_HD double bias_correction(double beta, double t) { return 1.0 - pow(beta, t); }

// ---- SPEC §3: AdamW (torch.optim.AdamW semantics) ----
// Coefficients of one tensor at step t (after the increment), computed once
// per tensor (per tile on the GPU) in double and rounded to W as the
// reference's Python scalars are.
template <class W>
struct AdamWCoef {
  W decay;          // 1 - lr * weight_decay (exactly 1 when weight_decay == 0)
  W lerp_w;         // 1 - beta1
  W beta2;
  W one_minus_beta2;
  W neg_step_size;  // -lr / (1 - beta1^t)
  W bc2_sqrt;       // sqrt(1 - beta2^t)
  W eps;
};

template <class W>
FSAM_HD AdamWCoef<W> adamw_coef(double t, double lr, double beta1, double beta2,
                               double eps, double weight_decay) {
  AdamWCoef<W> c;
  c.decay = (W)(1.0 - lr * weight_decay);
  c.lerp_w = (W)(1.0 - beta1);
  c.beta2 = (W)beta2;
  c.one_minus_beta2 = (W)(1.0 - beta2);
  const double bc1 = bias_correction(beta1, t);
  const double bc2 = bias_correction(beta2, t);
  c.neg_step_size = (W)(-(lr / bc1));
  c.bc2_sqrt = (W)sqrt(bc2);
  c.eps = (W)eps;
  return c;
}

// torch.lerp's formula (weight < 0.5 and the other branch)
template <class W>
FSAM_HD W lerp_w(W self, W end, W weight) {
  return weight < (W)0.5 ? self + weight * (end - self)
                         : end - (end - self) * ((W)1 - weight);
}

// One element: p, m, v updated in place from the (unscaled, sign-applied) grad g.
template <class W>
FSAM_HD void adamw_update(W& p, W g, W& m, W& v, const AdamWCoef<W>& c) {
  p = p * c.decay;                                      // exact when decay == 1
  m = lerp_w(m, g, c.lerp_w);
  v = v * c.beta2 + (c.one_minus_beta2 * g) * g;        // mul_ + addcmul_
  const W denom = sqrt_w(v) / c.bc2_sqrt + c.eps;       // (sqrt(v)/bc2_sqrt).add_(eps)
  p = p + (c.neg_step_size * m) / denom;                // addcdiv_(m, denom, -step)
}

}  // namespace fsam
