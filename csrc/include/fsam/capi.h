/* fsam/capi.h: the C API of the native fsam_kernels libraries.
 *
 * Plain C, independent of the torch ABI: one build serves any torch version.
 * Python (fsam_kernels/backends/native.py) loads libfsam_cpu.so and, where a
 * CUDA device is present, libfsam_cuda.so with ctypes and calls these
 * functions with raw pointers taken from torch tensors.
 *
 * Each operation is one of SPEC.md §6 over a list of tensors given as an
 * array of fsam_tensor_t records (one per parameter). All pointers address
 * the first element of a dense, non-overlapping tensor; the kernels operate
 * on memory order, so p, g, b, m, v of one record must share strides (the
 * Python side guarantees it). Unused pointers may be NULL. Empty tensors
 * (numel == 0) may appear anywhere.
 *
 * Return value: 0 on success, non-zero on error; the message is then
 * available from fsam_*_last_error() (thread-local on the CPU).
 */
#ifndef FSAM_CAPI_H_
#define FSAM_CAPI_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FSAM_API_VERSION 3  /* 3: N² is a double (SPEC §1); later additions (*_chunk_starts) keep it */

#if defined(_WIN32)
#define FSAM_API __declspec(dllexport)
#else
#define FSAM_API __attribute__((visibility("default")))
#endif

/* dtype codes */
#define FSAM_F32 0
#define FSAM_F16 1
#define FSAM_BF16 2
#define FSAM_F64 3

/* One tensor of a multi-tensor call: 64 bytes, 8-byte fields, so Python can
 * build an array of them as an int64 array of shape (n, 8). */
typedef struct fsam_tensor {
  void* p;          /* parameter (param dtype)                               */
  const void* g;    /* gradient (g_dtype; read only)                         */
  void* b;          /* backup (param dtype)                                  */
  void* m;          /* exp_avg (float32; float64 for float64 params)         */
  void* v;          /* exp_avg_sq (same dtype as m)                          */
  float* step;      /* 0-d float32 step t of this parameter                  */
  int64_t numel;    /* number of elements (>= 0)                             */
  int32_t p_dtype;  /* dtype of p and b; state is float64 iff p is float64.
                       In sq_norm (no param): the dtype of v, or of the
                       working precision (FSAM_F64 for float64 grads).       */
  int32_t g_dtype;  /* dtype of g                                            */
} fsam_tensor_t;

/* Supported (p_dtype, g_dtype): p in {F32, F16, BF16} with g in
 * {F32, F16, BF16}; p = F64 with g = F64. */

/* ------------------------------------------------------------------ CPU */
FSAM_API int fsam_cpu_api_version(void);
FSAM_API const char* fsam_cpu_last_error(void);
/* elements per chunk: every tensor is cut into chunks of this size and the
 * chunks of all tensors are spread over the threads of one parallel region */
FSAM_API int64_t fsam_cpu_chunk_size(void);
/* The chunk table of a call (host memory; fsam/tables.h): starts[i] = the
 * first chunk of tensor i, chunks of `chunk` elements, starts[n] = the number
 * of chunks (returned). n + 1 entries. */
FSAM_API int64_t fsam_cpu_chunk_starts(const fsam_tensor_t* t, int64_t n, int64_t chunk,
                                       int64_t* starts);
FSAM_API void fsam_cpu_set_num_threads(int n);   /* n <= 0: the machine's CPU count */
FSAM_API int fsam_cpu_get_num_threads(void);
/* Instruction set of the kernels: 0 baseline (the build's flags, x86-64-v2),
 * 1 AVX2 (+F16C, BMI2), 2 AVX-512 (F, VL, BW, DQ). Results are bitwise the
 * same at every level (SPEC §5).
 * best: the highest level this CPU (and OS) supports.
 * get: the level in effect: the one set, else the default, which is the best
 *   capped by $FSAM_CPU_ISA (baseline|avx2|avx512 or 0|1|2, read on first use).
 * set: force `level` for every later call in the process (all threads);
 *   level < 0 restores the default. A level the CPU lacks (or > 2) is an
 *   error: returns -1, nothing changes, fsam_cpu_last_error() says why.
 *   Otherwise returns the level now in effect. */
FSAM_API int fsam_cpu_best_isa(void);
FSAM_API int fsam_cpu_get_isa(void);
FSAM_API int fsam_cpu_set_isa(int level);
/* streaming (non-temporal) stores for write-only outputs in calls moving at
 * least this many bytes (default 32 MiB, or $FSAM_NT_MIN_BYTES); -1: never;
 * set with a value < -1 restores the default. Results do not depend on it. */
FSAM_API int64_t fsam_cpu_get_nt_min_bytes(void);
FSAM_API void fsam_cpu_set_nt_min_bytes(int64_t bytes);

/* N² (SPEC §1) is a float64 device scalar: sq_norm adds to it, perturb reads
 * it. Within a chunk/tile float32 lanes may accumulate; every partial sum and
 * every total (across chunks, tiles, calls and groups) is a double, summed in
 * a fixed order, so N² does not depend on the thread count, the instruction
 * set, or how the parameters are grouped beyond float64 rounding. perturb
 * rounds N² once to float32 and forms the scale from that in float32.
 *
 * 1. out += sum_i sum d_i^2 (SPEC §1), accumulated per chunk in double,
 *    chunks summed in a fixed order (independent of the thread count).
 *    Uses g, v (if precondition), step (if precondition), numel, dtypes. */
FSAM_API int fsam_cpu_sq_norm(const fsam_tensor_t* t, int64_t n, int precondition,
                     double beta2, double eps, const float* grad_scale, double* out);

/* 2. b <- p; p <- p + scale * d with scale = rho / (sqrt(n2) + norm_eps) in
 *    float32, n2 = (float)*norm_sq. If *norm_sq is not finite, *found_inf = 1.
 *    If *found_inf != 0, p is left unchanged. */
FSAM_API int fsam_cpu_perturb(const fsam_tensor_t* t, int64_t n, int precondition, double rho,
                     const double* norm_sq, double norm_eps, double beta2, double eps,
                     const float* grad_scale, float* found_inf);

/* 3. p <- b (if has_backup), then unless *found_inf != 0 the AdamW update of
 *    SPEC §3 at t = *step + 1, and *step += 1. */
FSAM_API int fsam_cpu_restore_adamw(const fsam_tensor_t* t, int64_t n, int has_backup, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           int maximize, const float* grad_scale, const float* found_inf);

/* 4. p <- b bitwise */
FSAM_API int fsam_cpu_restore(const fsam_tensor_t* t, int64_t n);

/* dtype conversion through the kernels' own routines (for tests) */
FSAM_API int fsam_cpu_cast(const void* src, int32_t src_dtype, void* dst, int32_t dst_dtype,
                  int64_t n);

/* ----------------------------------------------------------------- CUDA
 * All pointers are device pointers, including the record table `t` and the
 * chunk table `chunk_start` (int64, n + 1 entries: the first tile of each
 * tensor, tiles of fsam_cuda_tile_size() elements; chunk_start[n] = n_tiles).
 * `device` is the CUDA device index the pointers live on (made current if it
 * is not), `stream` a cudaStream_t on it (NULL: the legacy default stream).
 * The calls enqueue kernels and never synchronise. */
FSAM_API int fsam_cuda_api_version(void);
FSAM_API const char* fsam_cuda_last_error(void);
FSAM_API int64_t fsam_cuda_tile_size(void);
/* fsam_cpu_chunk_starts of this library's build, on HOST memory: the chunk
 * table the launches take (chunk = fsam_cuda_tile_size()), before upload. */
FSAM_API int64_t fsam_cuda_chunk_starts(const fsam_tensor_t* t, int64_t n, int64_t tile,
                                        int64_t* starts);
FSAM_API int fsam_cuda_device_count(void);

/* partials: device double workspace of n_tiles entries (one partial per tile,
 * reduced in tile order by a second kernel: deterministic); out and norm_sq
 * are device doubles as on the CPU */
FSAM_API int fsam_cuda_sq_norm(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                      int64_t n_tiles, double* partials, int precondition, double beta2,
                      double eps, const float* grad_scale, double* out, int device, void* stream);
FSAM_API int fsam_cuda_perturb(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                      int64_t n_tiles, int precondition, double rho, const double* norm_sq,
                      double norm_eps, double beta2, double eps, const float* grad_scale,
                      float* found_inf, int device, void* stream);
FSAM_API int fsam_cuda_restore_adamw(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                            int64_t n_tiles, int has_backup, double lr, double beta1,
                            double beta2, double eps, double weight_decay, int maximize,
                            const float* grad_scale, const float* found_inf, int device, void* stream);
FSAM_API int fsam_cuda_restore(const fsam_tensor_t* t, const int64_t* chunk_start, int64_t n,
                      int64_t n_tiles, int device, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* FSAM_CAPI_H_ */
