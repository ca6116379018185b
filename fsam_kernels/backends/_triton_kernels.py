"""Triton kernels of the triton backend (SPEC §6); the host side is triton.py.

Every element kernel covers every tensor of one dtype combination in one
launch. For each combination the host (triton.py's ``_Plan``, derived from the
call's record table of the shared preparation layer, _prepare.py, and kept on
its cache entry) passes views of one int64 device buffer:

- per-role pointer tables (data pointers, one entry per tensor of the
  combination, in the same order in every role: params, grads, backups,
  exp_avgs, exp_avg_sqs),
- a numel table (one entry per tensor of the combination),
- a tile table: for program ``pid``, ``tile_tensor[pid]`` is the tensor index
  (within the combination) and ``tile_chunk[pid]`` the chunk index inside
  that tensor; a chunk is ``CHUNK`` consecutive elements in memory order,
  processed in ``CHUNK // BLOCK`` blocks,
- the coefficient buffer of the call (below) offset to the combination's
  first tensor.

Launches per call: ``coef_kernel`` once (restore_adamw whenever it has
tensors; sq_norm and perturb when preconditioned) over one step pointer
table of every tensor of the call, in launch order (the combinations one
after another; in restore_adamw the empty tensors last, their steps count
too); then one
element kernel per combination; sq_norm adds ``sq_norm_finish_kernel`` (and
launches nothing without a non-empty grad), a perturb with no non-empty
tensor runs only ``flag_nonfinite_kernel``, restore only ``restore_kernel``.

All element offsets are int64. Hyperparameters are runtime scalars (never
``tl.constexpr``); values whose float32 rounding would show in the result are
passed as a (hi, lo) float32 pair and re-joined in float64 inside the kernel.

Per-tensor step-dependent coefficients (bias corrections ``1 - beta**t``) are
computed once per call by ``coef_kernel`` in float64, from the steps read
through the step pointer table, into a small float64 buffer (two values per
tensor) that the element kernels read by tensor index (from their
combination's offset). For AdamW the same
kernel increments the steps, after reading them and before any element
kernel runs, so no tile ever sees a half-updated step.

Arithmetic is float32 (float64 for float64 parameters: ``CT`` / ``F64``);
16-bit values are cast on load and rounded once on store, to nearest even:
bfloat16 through an explicit rounding of the float32 bits (``_to_param``, as
csrc/include/fsam/math.h does), because the Triton interpreter's float32 to
bfloat16 cast truncates; float16 through the plain cast, which rounds to
nearest even both compiled (``cvt.rn``) and interpreted (numpy). Divisions
and square roots use the correctly rounded forms (``div_rn``/``sqrt_rn`` in
float32), as the reference does.

N² (SPEC §1): per-tile partial sums in float64 (float32 accumulation inside a
tile), added in float64 in a fixed order into the float64 ``out``; the
perturbation kernel reads that float64 value, tests it for finiteness, and
rounds it once to float32 to form the scale.

The per-element pieces shared by the kernels (``_join``, ``_div``,
``_finite64``, ``_to_param``, ``_unscale``, ``_direction``: the Triton
counterparts of csrc/include/fsam/math.h) are ``@triton.jit`` helpers,
inlined when compiled.
"""

import triton
import triton.language as tl


# ------------------------------------------------------------- coefficients
@triton.jit
def _join(hi, lo, CT: tl.constexpr):
    """A runtime float64 hyperparameter passed as a float32 (hi, lo) pair, in CT."""
    return (tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)).to(CT)


@triton.jit
def _div(a, b, F64: tl.constexpr):
    """a / b, correctly rounded in float32 as the reference's torch ops are."""
    if F64:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def _finite64(x):
    """x (float64) is neither inf nor NaN: its exponent bits are not all ones."""
    bits = x.to(tl.int64, bitcast=True)
    return ((bits >> 52) & 0x7FF) != 0x7FF


@triton.jit
def _to_param(x, P_DT: tl.constexpr):
    """A float32 (or float64) working value rounded once to the parameter dtype,
    to nearest even. bfloat16 by hand on the float32 bits (the interpreter's cast
    truncates): add 0x7FFF plus the kept half's lowest bit, keep the high half;
    NaN becomes a quiet NaN of the same sign, inf stays inf, overflow gives inf."""
    if P_DT == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        nan = ((u >> 16) & 0x8000) | 0x7FC0
        h = tl.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded)
        r = h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(P_DT)
    return r


@triton.jit
def _unscale(g, s, HAS_SCALE: tl.constexpr, F64: tl.constexpr):
    """g / grad_scale (SPEC §4), once."""
    if HAS_SCALE:
        g = _div(g, s, F64)
    return g


@triton.jit
def _direction(g, v, bc2, eps, use, F64: tl.constexpr):
    """d of SPEC §1 for a preconditioned tensor: g / (sqrt(v / bc2) + eps) where
    ``use`` (the tensor has t >= 1), else g."""
    if F64:
        d = g / (tl.sqrt(v / bc2) + eps)
    else:
        d = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
    return tl.where(use, d, g)


@triton.jit
def coef_kernel(
    step_tab, n_steps, coef_ptr, found_inf_ptr,
    lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo,
    ADAMW: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-tensor coefficients from the steps, two float64 values per tensor.

    ADAMW False (preconditioned direction, step t as stored):
        coef[2i] = 1 if t >= 1 else 0,  coef[2i+1] = 1 - beta2**t (1 if t < 1)
    ADAMW True (the update, t' = t + 1):
        coef[2i] = lr / (1 - beta1**t'), coef[2i+1] = sqrt(1 - beta2**t'),
        and the step is set to t' unless found_inf is non-zero.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_steps
    ptrs = tl.load(step_tab + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    t = tl.load(ptrs, mask=mask, other=0.0)
    if ADAMW:
        t = t + 1.0
    use = t >= 1.0
    n = tl.where(use, t, 0.0).to(tl.int64)
    b1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    b2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    # beta ** n by squaring (steps are exact integers in float32: n < 2^64)
    p1 = tl.full([BLOCK], 1.0, tl.float64)
    p2 = tl.full([BLOCK], 1.0, tl.float64)
    sq1 = tl.full([BLOCK], 1.0, tl.float64) * b1
    sq2 = tl.full([BLOCK], 1.0, tl.float64) * b2
    for _ in range(64):
        odd = (n % 2) == 1
        p1 = tl.where(odd, p1 * sq1, p1)
        p2 = tl.where(odd, p2 * sq2, p2)
        sq1 = sq1 * sq1
        sq2 = sq2 * sq2
        n = n // 2
    bc1 = 1.0 - p1
    bc2 = 1.0 - p2
    if ADAMW:
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
        c0 = lr / bc1
        c1 = tl.sqrt(bc2)
        keep = tl.load(found_inf_ptr) == 0.0
        tl.store(ptrs, t, mask=offs < tl.where(keep, n_steps, 0))
    else:
        c0 = tl.where(use, 1.0, 0.0).to(tl.float64)
        c1 = tl.where(use, bc2, 1.0)
    tl.store(coef_ptr + 2 * offs, c0, mask=mask)
    tl.store(coef_ptr + 2 * offs + 1, c1, mask=mask)


# --------------------------------------------------------------------- sq_norm
@triton.jit
def sq_norm_partial_kernel(
    tile_tensor_ptr, tile_chunk_ptr, numel_ptr,
    g_tab, v_tab, coef_ptr, scale_ptr, partial_ptr,
    eps_hi, eps_lo,
    G_DT: tl.constexpr, V_DT: tl.constexpr, CT: tl.constexpr, F64: tl.constexpr,
    PRECOND: tl.constexpr, HAS_SCALE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[pid] = Σ d² over this program's tile (float64)."""
    pid = tl.program_id(0)
    tid = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    start = tl.load(tile_chunk_ptr + pid).to(tl.int64) * CHUNK
    n = tl.load(numel_ptr + tid).to(tl.int64)
    g_ptr = tl.load(g_tab + tid).to(tl.pointer_type(G_DT))
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(CT)
    else:
        s = 1.0  # unused: _unscale is the identity without a grad_scale
    if PRECOND:
        v_ptr = tl.load(v_tab + tid).to(tl.pointer_type(V_DT))
        use = tl.load(coef_ptr + 2 * tid) != 0.0
        bc2 = tl.load(coef_ptr + 2 * tid + 1).to(CT)
        eps = _join(eps_hi, eps_lo, CT)
    acc = tl.full([BLOCK], 0.0, CT)
    for it in range(0, CHUNK, BLOCK):
        offs = start + it + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
        g = _unscale(g, s, HAS_SCALE, F64)
        if PRECOND:
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
            g = _direction(g, v, bc2, eps, use, F64)
        g = tl.where(mask, g, 0.0)
        acc += g * g
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def sq_norm_finish_kernel(partial_ptr, n_partials, out_ptr, BLOCK: tl.constexpr):
    """out += Σ partial, summed in float64 in a fixed order (one program); ``out``
    is float64, so N² stays float64 across calls and groups (SPEC §1)."""
    acc = tl.full([BLOCK], 0.0, tl.float64)
    # a while loop, not range(0, n_partials, BLOCK): the Triton 3.6 interpreter
    # cannot take a runtime scalar as a range bound under NumPy >= 2.4
    start = tl.full([], 0, tl.int64)
    while start < n_partials:
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
        start += BLOCK
    total = tl.sum(acc, axis=0)
    o = tl.load(out_ptr).to(tl.float64)
    tl.store(out_ptr, o + total)


# --------------------------------------------------------------------- perturb
@triton.jit
def flag_nonfinite_kernel(norm_ptr, found_inf_ptr):
    """found_inf <- 1 if N² (float64) is not finite (used when there is nothing to
    perturb)."""
    n2 = tl.load(norm_ptr).to(tl.float64)
    if ~_finite64(n2):
        tl.store(found_inf_ptr, 1.0)


@triton.jit
def perturb_kernel(
    tile_tensor_ptr, tile_chunk_ptr, numel_ptr,
    p_tab, g_tab, b_tab, v_tab, coef_ptr,
    scale_ptr, norm_ptr, found_inf_ptr,
    rho, norm_eps, eps_hi, eps_lo,
    P_DT: tl.constexpr, G_DT: tl.constexpr, V_DT: tl.constexpr,
    CT: tl.constexpr, F64: tl.constexpr,
    PRECOND: tl.constexpr, HAS_SCALE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """b <- p; p <- p + (rho / (sqrt(N²) + norm_eps)) * d unless skipped.

    N² is read as float64 and tested for finiteness there; the scale is formed
    in float32 from N² rounded once to float32 (SPEC §1)."""
    pid = tl.program_id(0)
    tid = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    start = tl.load(tile_chunk_ptr + pid).to(tl.int64) * CHUNK
    n = tl.load(numel_ptr + tid).to(tl.int64)
    n2_64 = tl.load(norm_ptr).to(tl.float64)
    finite = _finite64(n2_64)
    if (pid == 0) & (~finite):
        tl.store(found_inf_ptr, 1.0)
    n2 = n2_64.to(tl.float32)
    # every program decides from N² itself, so the write above cannot race it
    keep = (tl.load(found_inf_ptr) == 0.0) & finite
    n_keep = tl.where(keep, n, 0)  # bound of the elements written to p
    scale = tl.div_rn(tl.cast(rho, tl.float32),
                      tl.sqrt_rn(n2) + tl.cast(norm_eps, tl.float32)).to(CT)
    p_ptr = tl.load(p_tab + tid).to(tl.pointer_type(P_DT))
    b_ptr = tl.load(b_tab + tid).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_tab + tid).to(tl.pointer_type(G_DT))
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(CT)
    else:
        s = 1.0  # unused: _unscale is the identity without a grad_scale
    if PRECOND:
        v_ptr = tl.load(v_tab + tid).to(tl.pointer_type(V_DT))
        use = tl.load(coef_ptr + 2 * tid) != 0.0
        bc2 = tl.load(coef_ptr + 2 * tid + 1).to(CT)
        eps = _join(eps_hi, eps_lo, CT)
    for it in range(0, CHUNK, BLOCK):
        offs = start + it + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        tl.store(b_ptr + offs, p, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
        g = _unscale(g, s, HAS_SCALE, F64)
        if PRECOND:
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
            g = _direction(g, v, bc2, eps, use, F64)
        new_p = _to_param(p.to(CT) + g * scale, P_DT)
        tl.store(p_ptr + offs, new_p, mask=offs < n_keep)


# --------------------------------------------------------------- restore_adamw
@triton.jit
def restore_adamw_kernel(
    tile_tensor_ptr, tile_chunk_ptr, numel_ptr,
    p_tab, g_tab, b_tab, m_tab, v_tab, coef_ptr,
    scale_ptr, found_inf_ptr,
    decay_hi, decay_lo, w1_hi, w1_lo, beta2_hi, beta2_lo, omb2_hi, omb2_lo,
    eps_hi, eps_lo, gsign,
    P_DT: tl.constexpr, G_DT: tl.constexpr, CT: tl.constexpr, F64: tl.constexpr,
    HAS_BACKUP: tl.constexpr, HAS_SCALE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """p <- b; then AdamW (SPEC §3) unless found_inf (coef from coef_kernel)."""
    pid = tl.program_id(0)
    tid = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    start = tl.load(tile_chunk_ptr + pid).to(tl.int64) * CHUNK
    n = tl.load(numel_ptr + tid).to(tl.int64)
    keep = tl.load(found_inf_ptr) == 0.0
    n_keep = tl.where(keep, n, 0)  # bound of the elements whose state is written
    step_size = tl.load(coef_ptr + 2 * tid).to(CT)
    bc2_sqrt = tl.load(coef_ptr + 2 * tid + 1).to(CT)
    decay = _join(decay_hi, decay_lo, CT)
    w1 = _join(w1_hi, w1_lo, CT)
    beta2 = _join(beta2_hi, beta2_lo, CT)
    omb2 = _join(omb2_hi, omb2_lo, CT)
    eps = _join(eps_hi, eps_lo, CT)
    sign = tl.cast(gsign, CT)
    small = w1 < 0.5
    p_ptr = tl.load(p_tab + tid).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_tab + tid).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(m_tab + tid).to(tl.pointer_type(CT))
    v_ptr = tl.load(v_tab + tid).to(tl.pointer_type(CT))
    if HAS_BACKUP:
        b_ptr = tl.load(b_tab + tid).to(tl.pointer_type(P_DT))
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(CT)
    else:
        s = 1.0  # unused: _unscale is the identity without a grad_scale
    for it in range(0, CHUNK, BLOCK):
        offs = start + it + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        if HAS_BACKUP:
            p_raw = tl.load(b_ptr + offs, mask=mask, other=0.0)
        else:
            p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
        g = _unscale(g, s, HAS_SCALE, F64)
        g = g * sign
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        # torch.lerp with a scalar weight
        diff = g - m
        m = tl.where(small, m + w1 * diff, g - diff * (1.0 - w1))
        v = v * beta2 + (omb2 * g) * g
        w = p_raw.to(CT) * decay
        if F64:
            w = w - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        else:
            den = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            w = w + (-step_size) * tl.div_rn(m, den)
        tl.store(p_ptr + offs, tl.where(keep, _to_param(w, P_DT), p_raw), mask=mask)
        tl.store(m_ptr + offs, m, mask=offs < n_keep)
        tl.store(v_ptr + offs, v, mask=offs < n_keep)


# --------------------------------------------------------------------- restore
@triton.jit
def restore_kernel(
    tile_tensor_ptr, tile_chunk_ptr, numel_ptr, p_tab, b_tab,
    P_DT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """p <- b (bitwise)."""
    pid = tl.program_id(0)
    tid = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    start = tl.load(tile_chunk_ptr + pid).to(tl.int64) * CHUNK
    n = tl.load(numel_ptr + tid).to(tl.int64)
    p_ptr = tl.load(p_tab + tid).to(tl.pointer_type(P_DT))
    b_ptr = tl.load(b_tab + tid).to(tl.pointer_type(P_DT))
    for it in range(0, CHUNK, BLOCK):
        offs = start + it + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        tl.store(p_ptr + offs, tl.load(b_ptr + offs, mask=mask), mask=mask)
