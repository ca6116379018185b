// Multi-tensor CPU kernels of SPEC.md §6 behind the C API of fsam/capi.h.
//
// Every tensor of a call is cut into chunks of kChunk elements; the chunks of
// all tensors form one work list, spread over the threads of a small
// persistent pool in ONE parallel region per operation (the caller thread
// works too). Inner loops are plain C++ over memory order, written so the
// compiler vectorises them (`#pragma omp simd` with -fopenmp-simd: no OpenMP
// runtime is linked, so nothing clashes with torch's own libgomp).
//
// Determinism: the squared norm is reduced per chunk (float lanes over
// 256-element blocks, flushed into double), the per-chunk double partials are
// stored by chunk index and summed in chunk order after the region, and added
// to the caller's double N² (SPEC §1): the result does not depend on the
// number of threads, on which thread ran which chunk, or on the instruction
// set (the lanes are explicit, the same in every instance).
#include "fsam/capi.h"
#include "fsam/math.h"
#include "fsam/tables.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FSAM_X86 1
#include <immintrin.h>
#else
#define FSAM_X86 0
#endif

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <climits>
#include <cstdint>
#include <cstring>
#include <cctype>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using fsam::AdamWCoef;
using fsam::bf16_t;
using fsam::half_t;

constexpr int64_t kChunk = 65536;            // elements per chunk
constexpr int64_t kSerialBelow = 2 * kChunk;  // smaller calls run on the caller

thread_local std::string g_error;

int fail(const std::string& msg) {
  g_error = msg;
  return 1;
}

// ------------------------------------------------------------------ thread pool
class Pool {
 public:
  explicit Pool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return n_threads_; }

  // Calls fn(i) for every i in [0, n_items), items handed out dynamically.
  void run(int64_t n_items, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lk(run_mu_);
    if (workers_.empty() || n_items <= 1) {
      for (int64_t i = 0; i < n_items; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_items_ = n_items;
      next_.store(0, std::memory_order_relaxed);
      active_ = (int)workers_.size();
      ++generation_;
    }
    cv_work_.notify_all();
    drain();
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void drain() {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items_) break;
      (*fn_)(i);
    }
  }
  void worker() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_work_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--active_ == 0) cv_done_.notify_one();
      }
    }
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;   // leaked in a forked child (its threads do not exist there)
int g_num_threads = 0;    // 0: not chosen yet

int default_threads() {
  if (const char* env = std::getenv("FSAM_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n ? (int)n : 1;
}

void atfork_child() {
  // The worker threads did not survive the fork: forget the pool (leak it,
  // its mutexes may be held) and build a fresh one on the next call.
  new (&g_pool_mu) std::mutex();
  g_pool = nullptr;
}

Pool& pool() {
  static bool registered = [] { return pthread_atfork(nullptr, nullptr, atfork_child) == 0; }();
  (void)registered;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_num_threads <= 0) g_num_threads = default_threads();
  if (g_pool == nullptr || g_pool->size() != g_num_threads) {
    delete g_pool;
    g_pool = new Pool(g_num_threads);
  }
  return *g_pool;
}

// ------------------------------------------------------------------ chunk list
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The chunks of fsam::chunk_starts (the chunk table the CUDA launches use too), listed.
std::vector<Chunk> make_chunks(const fsam_tensor_t* t, int64_t n, int64_t* total) {
  std::vector<int64_t> starts(n + 1);
  std::vector<Chunk> chunks((size_t)fsam::chunk_starts(t, n, kChunk, starts.data()));
  int64_t elems = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = t[i].numel;
    elems += numel;
    for (int64_t c = starts[i]; c < starts[i + 1]; ++c) {
      const int64_t b = (c - starts[i]) * kChunk;
      chunks[c] = {i, b, std::min(numel, b + kChunk)};
    }
  }
  *total = elems;
  return chunks;
}

// One parallel region over the chunk list (serial on the caller when small).
template <class F>
void parallel_chunks(const std::vector<Chunk>& chunks, int64_t total_elems, F&& body) {
  if (total_elems < kSerialBelow || chunks.size() <= 1) {
    for (size_t i = 0; i < chunks.size(); ++i) body((int64_t)i);
    return;
  }
  std::function<void(int64_t)> fn = [&](int64_t i) { body(i); };
  pool().run((int64_t)chunks.size(), fn);
}

int check_pairs(const fsam_tensor_t* t, int64_t n, const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    if (t[i].numel < 0) return fail(std::string(op) + ": tensor " + std::to_string(i) + " has numel < 0");
    if (!fsam::supported_pair(t[i].p_dtype, t[i].g_dtype))
      return fail(std::string(op) + ": tensor " + std::to_string(i) +
                  ": unsupported (param/state dtype, grad dtype) codes (" +
                  std::to_string(t[i].p_dtype) + ", " + std::to_string(t[i].g_dtype) + ")");
  }
  return 0;
}

// Dispatch on a grad dtype code: calls f((G*)nullptr).
template <class F>
void with_g(int32_t gd, F&& f) {
  switch (gd) {
    case fsam::kF32: f((const float*)nullptr); break;
    case fsam::kF16: f((const half_t*)nullptr); break;
    case fsam::kBF16: f((const bf16_t*)nullptr); break;
    default: f((const double*)nullptr); break;
  }
}
template <class F>
void with_p(int32_t pd, F&& f) {
  switch (pd) {
    case fsam::kF32: f((float*)nullptr); break;
    case fsam::kF16: f((half_t*)nullptr); break;
    case fsam::kBF16: f((bf16_t*)nullptr); break;
    default: f((double*)nullptr); break;
  }
}

using fsam::Work;

// Per-tensor 1 - beta2^t (double) for the preconditioned direction, or 0
// where the plain direction applies (not preconditioned, or t < 1).
std::vector<double> precond_bc2(const fsam_tensor_t* t, int64_t n, bool precondition, double beta2) {
  std::vector<double> bc2(n, 0.0);
  if (!precondition) return bc2;
  for (int64_t i = 0; i < n; ++i) {
    if (t[i].numel != 0) bc2[i] = fsam::precond_bc2(t[i].step, true, beta2);
  }
  return bc2;
}

// ------------------------------------------------------------------ kernels
// The per-range kernels (fsam/cpu_kernels.h), compiled once per instruction
// set and picked at run time (cpu_isa()): the build's baseline flags
// (x86-64-v2), AVX2 and AVX-512. The same C++ in each, bitwise the same
// results; wider vectors matter because the AdamW update (two divisions and
// a square root per element) is close to compute bound at 128 bits.
namespace kbase {
#define FSAM_ISA_ATTR
#define FSAM_ISA_LEVEL 0
#include "fsam/cpu_kernels.h"
#undef FSAM_ISA_ATTR
#undef FSAM_ISA_LEVEL
}  // namespace kbase
#if FSAM_X86
namespace kavx2 {
#define FSAM_ISA_ATTR __attribute__((target("avx2,f16c,bmi,bmi2,popcnt")))
#define FSAM_ISA_LEVEL 1
#include "fsam/cpu_kernels.h"
#undef FSAM_ISA_ATTR
#undef FSAM_ISA_LEVEL
}  // namespace kavx2
namespace kavx512 {
#define FSAM_ISA_ATTR \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,f16c,bmi,bmi2,popcnt,prefer-vector-width=512")))
#define FSAM_ISA_LEVEL 2
#include "fsam/cpu_kernels.h"
#undef FSAM_ISA_ATTR
#undef FSAM_ISA_LEVEL
}  // namespace kavx512
// ISA_CALL(isa, fn<...>(args)): the instance of the chosen instruction set.
#define ISA_CALL(isa, ...) \
  ((isa) >= 2 ? kavx512::__VA_ARGS__ : (isa) == 1 ? kavx2::__VA_ARGS__ : kbase::__VA_ARGS__)
#else
#define ISA_CALL(isa, ...) ((void)(isa), kbase::__VA_ARGS__)
#endif

inline void store_fence() {
#if FSAM_X86
  _mm_sfence();
#endif
}

// Instruction set: 0 baseline, 1 AVX2, 2 AVX-512 (F, VL, BW, DQ); the best the
// CPU (and OS) supports unless FSAM_CPU_ISA (baseline|avx2|avx512) or
// fsam_cpu_set_isa() asks for less.
int detect_isa() {
#if FSAM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return 1;
#endif
  return 0;
}

// $FSAM_CPU_ISA as a level (case-insensitive name or digit); -1 when unset
// or not one of those (the Python side warns about an unknown value).
int env_isa_level() {
  const char* env = std::getenv("FSAM_CPU_ISA");
  if (env == nullptr || *env == 0) return -1;
  std::string e(env);
  for (char& ch : e) ch = (char)std::tolower((unsigned char)ch);
  if (e == "baseline" || e == "0") return 0;
  if (e == "avx2" || e == "1") return 1;
  if (e == "avx512" || e == "2") return 2;
  return -1;
}

int env_isa(int best) {
  const int want = env_isa_level();
  return want < 0 ? best : std::min(want, best);
}

std::atomic<int> g_isa{-1};
int cpu_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = env_isa(detect_isa());
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

// Streaming stores for the write-only outputs when a call moves at least this
// many bytes (far beyond the caches: a smaller working set is better left in
// them for the next operation). FSAM_NT_MIN_BYTES overrides; < 0: never.
constexpr int64_t kDefaultNtMinBytes = int64_t(32) << 20;
std::atomic<int64_t> g_nt_min_bytes{INT64_MIN};
int64_t nt_min_bytes() {
  int64_t v = g_nt_min_bytes.load(std::memory_order_relaxed);
  if (v == INT64_MIN) {
    v = kDefaultNtMinBytes;
    if (const char* env = std::getenv("FSAM_NT_MIN_BYTES"))
      if (*env) v = std::atoll(env);
    g_nt_min_bytes.store(v, std::memory_order_relaxed);
  }
  return v;
}
bool use_nt(int64_t bytes) {
  const int64_t t = nt_min_bytes();
  return t >= 0 && bytes >= t;
}

size_t elem_size(int32_t dt) {
  return dt == fsam::kF64 ? 8 : dt == fsam::kF32 ? 4 : 2;
}

// Bytes a call moves: per element n_p param-dtype, n_g grad-dtype and n_s
// state (m, v) accesses.
int64_t call_bytes(const fsam_tensor_t* t, int64_t n, int n_p, int n_g, int n_s) {
  int64_t bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ss = t[i].p_dtype == fsam::kF64 ? 8 : 4;
    bytes += t[i].numel * (n_p * (int64_t)elem_size(t[i].p_dtype) +
                           n_g * (int64_t)elem_size(t[i].g_dtype) + n_s * ss);
  }
  return bytes;
}

// dst <- src, bytewise; with streaming stores (and a fence) when nt.
void copy_bytes(int isa, bool nt, void* dst, const void* src, size_t bytes) {
  if (!nt) {
    std::memcpy(dst, src, bytes);
    return;
  }
  ISA_CALL(isa, nt_copy(dst, src, bytes));
  store_fence();
}

using fsam::cast_coef;

}  // namespace

// ====================================================================== C API
extern "C" {

int fsam_cpu_api_version(void) { return FSAM_API_VERSION; }
const char* fsam_cpu_last_error(void) { return g_error.c_str(); }
int64_t fsam_cpu_chunk_size(void) { return kChunk; }

int64_t fsam_cpu_chunk_starts(const fsam_tensor_t* t, int64_t n, int64_t chunk, int64_t* starts) {
  return fsam::chunk_starts(t, n, chunk, starts);
}

void fsam_cpu_set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_num_threads = n > 0 ? n : default_threads();
}
int fsam_cpu_get_num_threads(void) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_num_threads <= 0) g_num_threads = default_threads();
  return g_num_threads;
}

int fsam_cpu_best_isa(void) { return detect_isa(); }
int fsam_cpu_get_isa(void) { return cpu_isa(); }
int fsam_cpu_set_isa(int level) {
  static const char* const kNames[] = {"baseline", "avx2", "avx512"};
  const int best = detect_isa();
  if (level > 2) {
    fail("set_isa: level " + std::to_string(level) + " is not 0 (baseline), 1 (avx2) or 2 (avx512)");
    return -1;
  }
  if (level > best) {
    fail(std::string("set_isa: this CPU lacks ") + kNames[level] + " (best: " + kNames[best] + ")");
    return -1;
  }
  const int isa = level < 0 ? env_isa(best) : level;
  g_isa.store(isa, std::memory_order_relaxed);
  return isa;
}
int64_t fsam_cpu_get_nt_min_bytes(void) { return nt_min_bytes(); }
void fsam_cpu_set_nt_min_bytes(int64_t bytes) {
  // -1: never; < -1: the default again (FSAM_NT_MIN_BYTES, else built in)
  g_nt_min_bytes.store(bytes < -1 ? INT64_MIN : bytes, std::memory_order_relaxed);
}

int fsam_cpu_sq_norm(const fsam_tensor_t* t, int64_t n, int precondition, double beta2,
                     double eps, const float* grad_scale, double* out) {
  try {
    if (out == nullptr) return fail("sq_norm: out is NULL");
    for (int64_t i = 0; i < n; ++i) {
      const int32_t wd = t[i].p_dtype, gd = t[i].g_dtype;
      const bool ok = (wd == fsam::kF64) ? gd == fsam::kF64
                                         : (wd == fsam::kF32 && gd != fsam::kF64 && gd >= 0 && gd <= 2);
      if (!ok) return fail("sq_norm: tensor " + std::to_string(i) + ": unsupported (state, grad) dtype codes (" +
                           std::to_string(wd) + ", " + std::to_string(gd) + ")");
      if (t[i].numel > 0 && t[i].g == nullptr) return fail("sq_norm: grad " + std::to_string(i) + " is NULL");
      if (precondition && t[i].numel > 0 && (t[i].v == nullptr || t[i].step == nullptr))
        return fail("sq_norm: precondition needs exp_avg_sq and step for tensor " + std::to_string(i));
    }
    const std::vector<double> bc2 = precond_bc2(t, n, precondition != 0, beta2);
    int64_t total_elems = 0;
    const std::vector<Chunk> chunks = make_chunks(t, n, &total_elems);
    std::vector<double> partial(chunks.size(), 0.0);
    const int isa = cpu_isa();
    const float gs32 = grad_scale ? *grad_scale : 1.0f;
    const bool has_gs = grad_scale != nullptr;
    parallel_chunks(chunks, total_elems, [&](int64_t ci) {
      const Chunk& c = chunks[ci];
      const fsam_tensor_t& r = t[c.tensor];
      const bool pre = bc2[c.tensor] != 0.0;
      const int64_t len = c.end - c.begin;
      with_g(r.g_dtype, [&](auto gtag) {
        using G = std::remove_const_t<std::remove_pointer_t<decltype(gtag)>>;
        using W = typename Work<G>::type;
        const G* g = (const G*)r.g + c.begin;
        const W* v = pre ? (const W*)r.v + c.begin : nullptr;
        const W gs = (W)gs32, b2 = (W)bc2[c.tensor], ep = (W)eps;
        double s;
        if (pre) s = has_gs ? ISA_CALL(isa, sqnorm_range<true, true>(g, v, len, gs, b2, ep))
                            : ISA_CALL(isa, sqnorm_range<true, false>(g, v, len, gs, b2, ep));
        else s = has_gs ? ISA_CALL(isa, sqnorm_range<false, true>(g, v, len, gs, b2, ep))
                        : ISA_CALL(isa, sqnorm_range<false, false>(g, v, len, gs, b2, ep));
        partial[ci] = s;
      });
    });
    double total = 0.0;
    for (double s : partial) total += s;  // fixed (chunk) order
    *out = *out + total;  // float64 throughout (SPEC §1)
    return 0;
  } catch (const std::exception& e) {
    return fail(std::string("sq_norm: ") + e.what());
  }
}

int fsam_cpu_perturb(const fsam_tensor_t* t, int64_t n, int precondition, double rho,
                     const double* norm_sq, double norm_eps, double beta2, double eps,
                     const float* grad_scale, float* found_inf) {
  try {
    if (norm_sq == nullptr || found_inf == nullptr) return fail("perturb: norm_sq or found_inf is NULL");
    if (int rc = check_pairs(t, n, "perturb")) return rc;
    for (int64_t i = 0; i < n; ++i) {
      if (t[i].numel == 0) continue;
      if (t[i].p == nullptr || t[i].g == nullptr || t[i].b == nullptr)
        return fail("perturb: param, grad or backup " + std::to_string(i) + " is NULL");
      if (precondition && (t[i].v == nullptr || t[i].step == nullptr))
        return fail("perturb: precondition needs exp_avg_sq and step for tensor " + std::to_string(i));
    }
    float scale32;
    const bool finite = fsam::perturb_scale(*norm_sq, (float)rho, (float)norm_eps, &scale32);
    if (!finite) *found_inf = 1.0f;
    const bool skip = *found_inf != 0.0f;
    const std::vector<double> bc2 = precond_bc2(t, n, precondition != 0 && !skip, beta2);
    int64_t total_elems = 0;
    const std::vector<Chunk> chunks = make_chunks(t, n, &total_elems);
    const float gs32 = grad_scale ? *grad_scale : 1.0f;
    const bool has_gs = grad_scale != nullptr;
    const int isa = cpu_isa();
    const bool nt = use_nt(call_bytes(t, n, 3, 1, 0));
    parallel_chunks(chunks, total_elems, [&](int64_t ci) {
      const Chunk& c = chunks[ci];
      const fsam_tensor_t& r = t[c.tensor];
      const int64_t len = c.end - c.begin;
      const size_t es = elem_size(r.p_dtype);
      if (skip) {
        copy_bytes(isa, nt, (char*)r.b + c.begin * es, (const char*)r.p + c.begin * es, len * es);
        return;
      }
      const bool pre = bc2[c.tensor] != 0.0;
      with_p(r.p_dtype, [&](auto ptag) {
        using P = std::remove_pointer_t<decltype(ptag)>;
        using W = typename Work<P>::type;
        with_g(r.g_dtype, [&](auto gtag) {
          using G = std::remove_const_t<std::remove_pointer_t<decltype(gtag)>>;
          if constexpr (std::is_same<W, double>::value != std::is_same<G, double>::value) {
            return;  // excluded by check_pairs
          } else {
            P* p = (P*)r.p + c.begin;
            P* b = (P*)r.b + c.begin;
            const G* g = (const G*)r.g + c.begin;
            const W* v = pre ? (const W*)r.v + c.begin : nullptr;
            const W gs = (W)gs32, b2 = (W)bc2[c.tensor], ep = (W)eps, sc = (W)scale32;
            if (nt) {
              if (pre) {
                if (has_gs) ISA_CALL(isa, perturb_range<true, true, true>(p, g, b, v, len, gs, b2, ep, sc));
                else ISA_CALL(isa, perturb_range<true, false, true>(p, g, b, v, len, gs, b2, ep, sc));
              } else {
                if (has_gs) ISA_CALL(isa, perturb_range<false, true, true>(p, g, b, v, len, gs, b2, ep, sc));
                else ISA_CALL(isa, perturb_range<false, false, true>(p, g, b, v, len, gs, b2, ep, sc));
              }
              store_fence();
            } else {
              if (pre) {
                if (has_gs) ISA_CALL(isa, perturb_range<true, true, false>(p, g, b, v, len, gs, b2, ep, sc));
                else ISA_CALL(isa, perturb_range<true, false, false>(p, g, b, v, len, gs, b2, ep, sc));
              } else {
                if (has_gs) ISA_CALL(isa, perturb_range<false, true, false>(p, g, b, v, len, gs, b2, ep, sc));
                else ISA_CALL(isa, perturb_range<false, false, false>(p, g, b, v, len, gs, b2, ep, sc));
              }
            }
          }
        });
      });
    });
    return 0;
  } catch (const std::exception& e) {
    return fail(std::string("perturb: ") + e.what());
  }
}

int fsam_cpu_restore_adamw(const fsam_tensor_t* t, int64_t n, int has_backup, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           int maximize, const float* grad_scale, const float* found_inf) {
  try {
    if (found_inf == nullptr) return fail("restore_adamw: found_inf is NULL");
    if (int rc = check_pairs(t, n, "restore_adamw")) return rc;
    for (int64_t i = 0; i < n; ++i) {
      if (t[i].step == nullptr) return fail("restore_adamw: step " + std::to_string(i) + " is NULL");
      if (t[i].numel == 0) continue;
      if (t[i].p == nullptr || t[i].g == nullptr || t[i].m == nullptr || t[i].v == nullptr ||
          (has_backup && t[i].b == nullptr))
        return fail("restore_adamw: a pointer of tensor " + std::to_string(i) + " is NULL");
    }
    const bool skip = *found_inf != 0.0f;
    std::vector<AdamWCoef<double>> coef(skip ? 0 : n);
    if (!skip)
      for (int64_t i = 0; i < n; ++i) {
        const float t_new = *t[i].step + 1.0f;  // step_t += 1 in float32
        // the steps of a group are usually equal: reuse the previous tensor's
        if (i > 0 && t_new == *t[i - 1].step + 1.0f) coef[i] = coef[i - 1];
        else coef[i] = fsam::adamw_coef<double>((double)t_new, lr, beta1, beta2, eps, weight_decay);
      }
    int64_t total_elems = 0;
    const std::vector<Chunk> chunks = make_chunks(t, n, &total_elems);
    const float gs32 = grad_scale ? *grad_scale : 1.0f;
    const bool has_gs = grad_scale != nullptr;
    const int isa = cpu_isa();
    const bool nt = has_backup && use_nt(call_bytes(t, n, 2, 1, 4));
    parallel_chunks(chunks, total_elems, [&](int64_t ci) {
      const Chunk& c = chunks[ci];
      const fsam_tensor_t& r = t[c.tensor];
      const int64_t len = c.end - c.begin;
      if (skip) {
        if (has_backup) {
          const size_t es = elem_size(r.p_dtype);
          copy_bytes(isa, nt, (char*)r.p + c.begin * es, (const char*)r.b + c.begin * es, len * es);
        }
        return;
      }
      with_p(r.p_dtype, [&](auto ptag) {
        using P = std::remove_pointer_t<decltype(ptag)>;
        using W = typename Work<P>::type;
        with_g(r.g_dtype, [&](auto gtag) {
          using G = std::remove_const_t<std::remove_pointer_t<decltype(gtag)>>;
          if constexpr (std::is_same<W, double>::value != std::is_same<G, double>::value) {
            return;  // excluded by check_pairs
          } else {
            P* p = (P*)r.p + c.begin;
            const P* src = has_backup ? (const P*)r.b + c.begin : p;
            const G* g = (const G*)r.g + c.begin;
            W* m = (W*)r.m + c.begin;
            W* v = (W*)r.v + c.begin;
            const W gs = (W)gs32;
            const AdamWCoef<W> cw = cast_coef<W>(coef[c.tensor]);
            if (nt) {
              if (has_gs) {
                if (maximize) ISA_CALL(isa, adamw_range<true, true, true>(p, src, g, m, v, len, gs, cw));
                else ISA_CALL(isa, adamw_range<true, false, true>(p, src, g, m, v, len, gs, cw));
              } else {
                if (maximize) ISA_CALL(isa, adamw_range<false, true, true>(p, src, g, m, v, len, gs, cw));
                else ISA_CALL(isa, adamw_range<false, false, true>(p, src, g, m, v, len, gs, cw));
              }
              store_fence();
            } else {
              if (has_gs) {
                if (maximize) ISA_CALL(isa, adamw_range<true, true, false>(p, src, g, m, v, len, gs, cw));
                else ISA_CALL(isa, adamw_range<true, false, false>(p, src, g, m, v, len, gs, cw));
              } else {
                if (maximize) ISA_CALL(isa, adamw_range<false, true, false>(p, src, g, m, v, len, gs, cw));
                else ISA_CALL(isa, adamw_range<false, false, false>(p, src, g, m, v, len, gs, cw));
              }
            }
          }
        });
      });
    });
    if (!skip)
      for (int64_t i = 0; i < n; ++i) *t[i].step = *t[i].step + 1.0f;
    return 0;
  } catch (const std::exception& e) {
    return fail(std::string("restore_adamw: ") + e.what());
  }
}

int fsam_cpu_restore(const fsam_tensor_t* t, int64_t n) {
  try {
    for (int64_t i = 0; i < n; ++i) {
      if (t[i].p_dtype < 0 || t[i].p_dtype > 3) return fail("restore: bad dtype code of tensor " + std::to_string(i));
      if (t[i].numel > 0 && (t[i].p == nullptr || t[i].b == nullptr))
        return fail("restore: param or backup " + std::to_string(i) + " is NULL");
    }
    int64_t total_elems = 0;
    const std::vector<Chunk> chunks = make_chunks(t, n, &total_elems);
    const int isa = cpu_isa();
    const bool nt = use_nt(call_bytes(t, n, 2, 0, 0));
    parallel_chunks(chunks, total_elems, [&](int64_t ci) {
      const Chunk& c = chunks[ci];
      const fsam_tensor_t& r = t[c.tensor];
      const size_t es = elem_size(r.p_dtype);
      copy_bytes(isa, nt, (char*)r.p + c.begin * es, (const char*)r.b + c.begin * es,
                 (c.end - c.begin) * es);
    });
    return 0;
  } catch (const std::exception& e) {
    return fail(std::string("restore: ") + e.what());
  }
}

int fsam_cpu_cast(const void* src, int32_t sd, void* dst, int32_t dd, int64_t n) {
  if (sd < 0 || sd > 3 || dd < 0 || dd > 3) return fail("cast: bad dtype code");
  for (int64_t i = 0; i < n; ++i) {
    double x;
    switch (sd) {
      case fsam::kF32: x = fsam::load<double>((const float*)src, i); break;
      case fsam::kF16: x = fsam::load<double>((const half_t*)src, i); break;
      case fsam::kBF16: x = fsam::load<double>((const bf16_t*)src, i); break;
      default: x = ((const double*)src)[i]; break;
    }
    // to a 16-bit type: through float (as the kernels do)
    switch (dd) {
      case fsam::kF32: ((float*)dst)[i] = (float)x; break;
      case fsam::kF16: fsam::store<float>((half_t*)dst, i, (float)x); break;
      case fsam::kBF16: fsam::store<float>((bf16_t*)dst, i, (float)x); break;
      default: ((double*)dst)[i] = x; break;
    }
  }
  return 0;
}

}  // extern "C"
