// fsam/cpu_kernels.h: the CPU per-range kernels of csrc/cpu/fsam_cpu.cpp.
//
// NOT a normal header: no include guard, no includes. fsam_cpu.cpp includes it
// once per instruction set, each time inside its own namespace and with
//   FSAM_ISA_ATTR   the function attribute of that set, e.g.
//                   __attribute__((target("avx2"))) (empty: the build's flags)
//   FSAM_ISA_LEVEL  0: baseline (SSE2..4.2), 1: AVX2, 2: AVX-512
// defined, after <immintrin.h>, <cstring>, fsam/math.h. The kernels are the
// same C++ in every instance; only the vector width differs. The loops keep
// IEEE semantics (no FMA contraction: -ffp-contract=off, no reassociation:
// the norm's lanes are explicit), so every instance gives bitwise the same
// results.
//
// Non-temporal ("streaming") stores: outputs that are written without being
// read (the backup in perturb, the parameter in restore_adamw with a backup)
// can be written around the caches, which saves the read-for-ownership of
// every destination line (a third of a copy's traffic). The caller decides
// (only for calls much larger than the caches) and issues the store fence
// (_mm_sfence) after its chunks.

// Copies `bytes` bytes; the destination's aligned middle with streaming stores.
FSAM_ISA_ATTR inline void nt_copy(void* dst_, const void* src_, size_t bytes) {
#if defined(__x86_64__) || defined(_M_X64)
#if FSAM_ISA_LEVEL >= 2
  constexpr size_t V = 64;
#elif FSAM_ISA_LEVEL >= 1
  constexpr size_t V = 32;
#else
  constexpr size_t V = 16;
#endif
  char* dst = (char*)dst_;
  const char* src = (const char*)src_;
  size_t head = (size_t)(-(uintptr_t)dst) & (V - 1);
  if (head > bytes) head = bytes;
  memcpy(dst, src, head);
  dst += head;
  src += head;
  bytes -= head;
  const size_t body = bytes & ~(V - 1);
  size_t i = 0;
#if FSAM_ISA_LEVEL >= 2
#define FSAM_NT_STORE(o) \
  _mm512_stream_si512((__m512i*)(dst + (o)), _mm512_loadu_si512((const void*)(src + (o))))
#elif FSAM_ISA_LEVEL >= 1
#define FSAM_NT_STORE(o) \
  _mm256_stream_si256((__m256i*)(dst + (o)), _mm256_loadu_si256((const __m256i*)(src + (o))))
#else
#define FSAM_NT_STORE(o) \
  _mm_stream_si128((__m128i*)(dst + (o)), _mm_loadu_si128((const __m128i*)(src + (o))))
#endif
  for (; i + 4 * V <= body; i += 4 * V) {
    FSAM_NT_STORE(i);
    FSAM_NT_STORE(i + V);
    FSAM_NT_STORE(i + 2 * V);
    FSAM_NT_STORE(i + 3 * V);
  }
  for (; i < body; i += V) FSAM_NT_STORE(i);
#undef FSAM_NT_STORE
  memcpy(dst + body, src + body, bytes - body);
#else
  memcpy(dst_, src_, bytes);
#endif
}

// 1. sq_norm over one range: float (or double) lanes over 256-element blocks,
//    each block's lanes summed into the double total in a fixed order.
template <bool PRE, bool GS, class G, class W>
FSAM_ISA_ATTR double sqnorm_range(const G* __restrict__ g, const W* __restrict__ v, int64_t n,
                                  W gs, W bc2, W eps) {
  constexpr int L = 16, B = 256;
  double total = 0.0;
  int64_t i = 0;
  for (; i + B <= n; i += B) {
    W acc[L];
    for (int k = 0; k < L; ++k) acc[k] = 0;
    for (int j = 0; j < B; j += L) {
#pragma omp simd
      for (int k = 0; k < L; ++k) {
        const int64_t e = i + j + k;
        W d = fsam::load<W>(g, e);
        if (GS) d = d / gs;
        if (PRE) d = fsam::precond_direction<W>(d, v[e], bc2, eps);
        acc[k] += d * d;
      }
    }
    double s = 0.0;
    for (int k = 0; k < L; ++k) s += (double)acc[k];
    total += s;
  }
  for (; i < n; ++i) {
    W d = fsam::load<W>(g, i);
    if (GS) d = d / gs;
    if (PRE) d = fsam::precond_direction<W>(d, v[i], bc2, eps);
    total += (double)(d * d);
  }
  return total;
}

// 2. perturb over one range: b <- p; p <- p + scale * d
//    NT: b is written with streaming stores first (p is then re-read from L2).
template <bool PRE, bool GS, bool NT, class P, class G, class W>
FSAM_ISA_ATTR void perturb_range(P* __restrict__ p, const G* __restrict__ g, P* __restrict__ b,
                                 const W* __restrict__ v, int64_t n, W gs, W bc2, W eps, W scale) {
  if (NT) {
    nt_copy(b, p, (size_t)n * sizeof(P));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      W d = fsam::load<W>(g, i);
      if (GS) d = d / gs;
      if (PRE) d = fsam::precond_direction<W>(d, v[i], bc2, eps);
      const W pi = fsam::load<W>(p, i);
      fsam::store<W>(p, i, fsam::perturbed<W>(pi, d, scale));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    W d = fsam::load<W>(g, i);
    if (GS) d = d / gs;
    if (PRE) d = fsam::precond_direction<W>(d, v[i], bc2, eps);
    const W pi = fsam::load<W>(p, i);
    fsam::copy_elem(b, p, i);
    fsam::store<W>(p, i, fsam::perturbed<W>(pi, d, scale));
  }
}

// 3. restore + AdamW over one range: src is the backup (or p itself)
template <bool GS, bool MAX, class P, class G, class W>
FSAM_ISA_ATTR inline void adamw_loop(P* __restrict__ dst, const P* __restrict__ s,
                                     const G* __restrict__ g, W* __restrict__ m,
                                     W* __restrict__ v, int64_t n, W gs, const AdamWCoef<W>& c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    W gi = fsam::load<W>(g, i);
    if (GS) gi = gi / gs;
    if (MAX) gi = -gi;
    W pi = fsam::load<W>(s, i), mi = m[i], vi = v[i];
    fsam::adamw_update<W>(pi, gi, mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    fsam::store<W>(dst, i, pi);
  }
}

//    NT (with a backup only): p computed block by block into an L1 buffer
//    and streamed out.
template <bool GS, bool MAX, bool NT, class P, class G, class W>
FSAM_ISA_ATTR void adamw_range(P* __restrict__ p, const P* src, const G* __restrict__ g,
                               W* __restrict__ m, W* __restrict__ v, int64_t n, W gs,
                               AdamWCoef<W> c) {
  if (src == p) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      W gi = fsam::load<W>(g, i);
      if (GS) gi = gi / gs;
      if (MAX) gi = -gi;
      W pi = fsam::load<W>(p, i), mi = m[i], vi = v[i];
      fsam::adamw_update<W>(pi, gi, mi, vi, c);
      m[i] = mi;
      v[i] = vi;
      fsam::store<W>(p, i, pi);
    }
  } else if (NT) {
    constexpr int64_t kBlock = 2048;
    alignas(64) P buf[kBlock];
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t len = n - i < kBlock ? n - i : kBlock;
      adamw_loop<GS, MAX>(buf, src + i, g + i, m + i, v + i, len, gs, c);
      nt_copy(p + i, buf, (size_t)len * sizeof(P));
    }
  } else {
    adamw_loop<GS, MAX>(p, src, g, m, v, n, gs, c);
  }
}
