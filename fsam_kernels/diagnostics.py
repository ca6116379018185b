"""Diagnostics: SAM's correction split into a logit path and a functional path,
and the sharpness (top Hessian eigenvalue, Hessian trace) of a model.

Singh, Mobahi, Agarwala, Dauphin, "Avoiding spurious sharpness minimization
broadens applicability of SAM" (ICML 2025, arXiv 2502.02407), §3-4: write the
gradient as ``g(θ) = J(θ)ᵀ c(θ)`` with ``z = F(θ; x)`` the model output
(logits), ``J = ∂z/∂θ`` and ``c = ∂ℓ/∂z`` the loss cotangent. With
``e = ρ·d/‖d‖`` (``d = g``, or the Adam-preconditioned ``g/(sqrt(v̂)+ε)``) and
index 0 for θ, 1 for θ + e:

=========  ==========  ==================================================
g          J0ᵀ c0      the gradient at θ
g_SAM      J1ᵀ c1      SAM's second gradient ∇L(θ+e)
g_FSAM     J1ᵀ c0      Functional-SAM's second gradient
g_LOGIT    J0ᵀ c1      only the cotangent moves (the "logit path")
=========  ==========  ==================================================

so that ``g_SAM − g = δ_logit + δ_func + cross`` exactly, with
``δ_logit = g_LOGIT − g = J0ᵀ(c1 − c0)`` (the change of the loss cotangent as
the logits move), ``δ_func = g_FSAM − g = (J1 − J0)ᵀ c0`` (the change of the
network Jacobian) and ``cross = (J1 − J0)ᵀ(c1 − c0) = O(ρ²)``. The paper argues
that on language models SAM's correction is dominated by δ_logit (which
Functional-SAM drops) and that this is what makes SAM weak there.

:func:`decompose` measures the four gradients with two forwards and four
vector-Jacobian products (no second-order graph). :func:`sharpness` estimates
the top Hessian eigenvalue (Lanczos) and the trace (Hutchinson), optionally of
the Gauss-Newton part ``Jᵀ H_z J`` too, from Hessian-vector products (double
backward). :func:`diagnose` runs both and returns one flat dict (what
``fsam-diagnose`` writes to JSON).

Model interface: ``model(x) -> z`` (a tensor, or a tuple/list/dict of
tensors) and ``loss_fn(z, y) -> scalar``. The parameters are
``params`` (a list of tensors) or, by default, the model's parameters that
require grad. None of these functions changes the parameters (bitwise) or
their ``.grad``; the global RNG state is restored afterwards and every forward
of one call sees the same RNG state (so dropout draws the same masks), but
prefer ``model.eval()`` for a measurement.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .backends.reference import ascent_direction as _direction

__all__ = [
    "Decomposition", "decompose", "ascent_direction", "hvp_operator", "gnvp_operator",
    "lanczos", "hutchinson_trace", "sharpness", "diagnose", "lm_loss", "diagnose_lm",
]

_NORM_EPS = 1e-12  # as SAM's ascent (SPEC §1)

TensorList = List[Tensor]


# --------------------------------------------------------------------------- helpers
def _resolve_params(model, params) -> Tuple[TensorList, Optional[List[str]]]:
    """The parameter list and, when every one is a named parameter of an
    ``nn.Module`` model, their names (which enables the two-forward path)."""
    names = None
    if params is None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError("params: required when model is not a torch.nn.Module "
                            f"(got a {type(model).__name__})")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        names = [n for n, _ in named]
    else:
        if isinstance(params, Tensor):
            params = [params]
        params = list(params)
        if isinstance(model, torch.nn.Module):
            by_id = {id(p): n for n, p in model.named_parameters()}
            if all(id(p) in by_id for p in params):
                names = [by_id[id(p)] for p in params]
    if not params:
        raise ValueError("params: no parameter requires grad")
    seen = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"params: item {i} is not a floating-point tensor")
        if not p.requires_grad:
            raise ValueError(f"params: item {i} (shape {tuple(p.shape)}) does not require grad")
        if id(p) in seen:
            raise ValueError(f"params: item {i} (shape {tuple(p.shape)}) appears twice")
        seen.add(id(p))
    return params, names


def _dot(a: TensorList, b: TensorList) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)).item()) if a else 0.0


def _norm(a: TensorList) -> float:
    return math.sqrt(max(_dot(a, a), 0.0))


def _sub(a: TensorList, b: TensorList) -> TensorList:
    return [x - y for x, y in zip(a, b)]


def _cos(a: TensorList, b: TensorList) -> float:
    na, nb = _norm(a), _norm(b)
    return _dot(a, b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def _leaves(z) -> Tuple[TensorList, Any]:
    leaves, spec = tree_flatten(z)
    for i, t in enumerate(leaves):
        if not isinstance(t, Tensor):
            raise TypeError(f"model output: leaf {i} is a {type(t).__name__}, expected tensors only")
    return leaves, spec


def _cotangent(loss_fn, z, y) -> Tuple[Tensor, TensorList, Any]:
    """``(loss, c, spec)`` with ``c = ∂loss/∂z`` per output leaf (zeros for
    leaves the loss does not use), computed in output space only."""
    leaves, spec = _leaves(z)
    zd = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in leaves]
    loss = loss_fn(tree_unflatten(zd, spec), y)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn: must return a 1-element tensor")
    diff = [t for t in zd if t.requires_grad]
    grads = torch.autograd.grad(loss, diff, allow_unused=True) if diff else []
    it = iter(grads)
    cs = []
    for t in zd:
        if t.requires_grad:
            gr = next(it)
            cs.append(torch.zeros_like(t) if gr is None else gr)
        else:
            cs.append(torch.zeros_like(t))
    return loss.detach(), cs, spec


def _vjp(z_leaves: TensorList, params: TensorList, cots: TensorList, retain: bool) -> TensorList:
    """``Jᵀ c`` for the outputs ``z_leaves`` w.r.t. ``params`` (zeros where unused)."""
    outs, gos = [], []
    for t, c in zip(z_leaves, cots):
        if t.requires_grad:
            outs.append(t)
            gos.append(c)
    if not outs:
        raise ValueError("model output: does not depend on the parameters (nothing requires grad)")
    grads = torch.autograd.grad(outs, params, gos, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]


@contextlib.contextmanager
def _same_rng(devices):
    """Fork the RNG (restored on exit) and yield a function that rewinds it to
    the state at entry, so every forward draws the same dropout masks."""
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        cpu = torch.get_rng_state()
        cst = {i: torch.cuda.get_rng_state(i) for i in cuda}

        def rewind():
            torch.set_rng_state(cpu)
            for i, s in cst.items():
                torch.cuda.set_rng_state(s, i)

        yield rewind


def _math_sdpa():
    """Double backward needs the math kernel of scaled_dot_product_attention
    (the fused CPU/CUDA kernels have no second derivative)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - old torch
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- ascent direction
def _group_of(optimizer, p) -> Optional[dict]:
    for g in optimizer.param_groups:
        for q in g["params"]:
            if q is p:
                return g
    return None


def ascent_direction(g: TensorList, params: TensorList, optimizer=None,
                     precondition: bool = False) -> TensorList:
    """SAM's ascent direction (SPEC §1, before normalisation).

    ``precondition=False``: ``d = g``. ``precondition=True``:
    ``d = g / (sqrt(v / (1 − β2^t)) + ε)`` per parameter with ``v`` =
    ``exp_avg_sq``, ``t`` = ``step`` from ``optimizer.state[p]`` and β2, ε
    from its parameter group (works for :class:`fsam_kernels.SAM`,
    :class:`fsam_kernels.FunctionalSAM` and ``torch.optim.AdamW``); a
    parameter without state or with ``t = 0`` uses ``d = g`` (SPEC choice).
    Raises ``ValueError`` if ``precondition`` is set without an optimizer.
    """
    if not precondition:
        return list(g)
    if optimizer is None:
        raise ValueError("precondition=True needs the optimizer (its exp_avg_sq and step)")
    out = []
    for p, gi in zip(params, g):
        st = optimizer.state.get(p, {})
        grp = _group_of(optimizer, p)
        t = st.get("step", 0)
        t = float(t.item()) if isinstance(t, Tensor) else float(t)
        if grp is None or "exp_avg_sq" not in st or t < 1:
            out.append(gi)
            continue
        beta2, eps = grp["betas"][1], grp["eps"]
        work = torch.float64 if gi.dtype == torch.float64 else torch.float32
        d = _direction(gi.to(work), st["exp_avg_sq"].to(work), t, beta2=beta2, eps=eps)
        out.append(d.to(gi.dtype))
    return out


# --------------------------------------------------------------------------- decomposition
@dataclass
class Decomposition:
    """Result of :func:`decompose` (norms are Euclidean over all parameters,
    accumulated in float64).

    rho, precondition: the perturbation used; e_norm = ‖e‖ (= rho up to 1e-12).
    loss, loss_perturbed: L(θ), L(θ+e).
    grad_norm: ‖g‖. sam_correction_norm: ‖g_SAM − g‖.
    delta_logit_norm: ‖δ_logit‖ = ‖g_LOGIT − g‖.
    delta_func_norm: ‖δ_func‖ = ‖g_FSAM − g‖.
    ratio: ‖δ_logit‖ / ‖δ_func‖ (inf when δ_func = 0).
    cross_norm: ‖g_SAM − g − δ_logit − δ_func‖; cross_rel: cross_norm / ‖g_SAM − g‖.
    cos_logit, cos_func: cosine of δ_logit, δ_func with g_SAM − g.
    cos_logit_func: cosine between δ_logit and δ_func.
    forwards: model forwards used (2 for an nn.Module, 3 for a plain callable).
    vectors: with ``return_vectors=True``, ``{"g", "g_sam", "g_fsam",
    "g_logit", "e"}`` as lists of tensors (not part of :meth:`to_dict`).
    """

    rho: float
    precondition: bool
    e_norm: float
    loss: float
    loss_perturbed: float
    grad_norm: float
    sam_correction_norm: float
    delta_logit_norm: float
    delta_func_norm: float
    ratio: float
    cross_norm: float
    cross_rel: float
    cos_logit: float
    cos_func: float
    cos_logit_func: float
    forwards: int
    vectors: Optional[Dict[str, TensorList]] = field(default=None, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        """Plain floats; non-finite values become None (strict JSON)."""
        d = asdict(self)
        d.pop("vectors")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def decompose(model: Callable, loss_fn: Callable, x, y, rho: float, *,
              params: Optional[Sequence[Tensor]] = None, optimizer=None,
              precondition: bool = False, return_vectors: bool = False) -> Decomposition:
    """Split SAM's correction ``g_SAM − g`` into logit path, functional path
    and cross term at the current parameters θ on the batch ``(x, y)``.

    Args:
        model: ``model(x) -> z`` (tensor or pytree of tensors).
        loss_fn: ``loss_fn(z, y) -> scalar`` (the training loss).
        x, y: the batch.
        rho (float, > 0): perturbation radius; ``e = rho·d/(‖d‖ + 1e-12)``.
        params: the parameters θ (default: ``model.parameters()`` requiring grad).
        optimizer: needed for ``precondition=True`` (see :func:`ascent_direction`).
        precondition: use the Adam-preconditioned ascent direction.
        return_vectors: keep g, g_SAM, g_FSAM, g_LOGIT and e in the result.

    Cost: for an ``nn.Module`` (parameters given by name), two forwards (θ via
    the module, θ + e via ``torch.func.functional_call`` with perturbed copies,
    so the parameters are never written) and four VJPs. For any other callable
    the parameters are perturbed in place, restored bitwise from a copy, and a
    third forward at θ is needed for ``J0ᵀ c1``.

    Returns a :class:`Decomposition`. Raises ``ValueError`` for ``rho <= 0``
    or a model output that does not depend on the parameters.
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho: expected a finite value > 0, got {rho!r}")
    params, names = _resolve_params(model, params)
    devices = {p.device for p in params}
    with _same_rng(devices) as rewind, torch.enable_grad():
        # pass at θ
        z0 = model(x)
        z0l, _ = _leaves(z0)
        loss0, c0, _ = _cotangent(loss_fn, z0, y)
        two_forwards = names is not None
        g = _vjp(z0l, params, c0, retain=two_forwards)
        d = ascent_direction(g, params, optimizer, precondition)
        scale = rho / (_norm(d) + _NORM_EPS)
        e = [(di.float() * scale).to(p.dtype) if p.dtype != torch.float64 else di * scale
             for di, p in zip(d, params)]
        rewind()
        if two_forwards:
            from torch.func import functional_call

            p1 = [(p.detach() + ei).requires_grad_(True) for p, ei in zip(params, e)]
            z1 = functional_call(model, dict(zip(names, p1)), (x,), strict=False, tie_weights=True)
            z1l, _ = _leaves(z1)
            loss1, c1, _ = _cotangent(loss_fn, z1, y)
            g_sam = _vjp(z1l, p1, c1, retain=True)
            g_fsam = _vjp(z1l, p1, c0, retain=False)
            g_logit = _vjp(z0l, params, c1, retain=False)
            forwards = 2
        else:
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                for p, ei in zip(params, e):
                    p.add_(ei)
            try:
                z1 = model(x)
                z1l, _ = _leaves(z1)
                loss1, c1, _ = _cotangent(loss_fn, z1, y)
                g_sam = _vjp(z1l, params, c1, retain=True)
                g_fsam = _vjp(z1l, params, c0, retain=False)
                del z1, z1l
            finally:
                with torch.no_grad():
                    for p, b in zip(params, backup):
                        p.copy_(b)
            rewind()
            z0b = model(x)
            g_logit = _vjp(_leaves(z0b)[0], params, c1, retain=False)
            forwards = 3
    sam_corr = _sub(g_sam, g)
    d_logit = _sub(g_logit, g)
    d_func = _sub(g_fsam, g)
    cross = [s - a - b for s, a, b in zip(sam_corr, d_logit, d_func)]
    nl, nf, ns = _norm(d_logit), _norm(d_func), _norm(sam_corr)
    nc = _norm(cross)
    res = Decomposition(
        rho=float(rho), precondition=bool(precondition), e_norm=_norm(e),
        loss=float(loss0.item()), loss_perturbed=float(loss1.item()),
        grad_norm=_norm(g), sam_correction_norm=ns,
        delta_logit_norm=nl, delta_func_norm=nf,
        ratio=(nl / nf) if nf > 0 else float("inf"),
        cross_norm=nc, cross_rel=(nc / ns) if ns > 0 else float("nan"),
        cos_logit=_cos(d_logit, sam_corr), cos_func=_cos(d_func, sam_corr),
        cos_logit_func=_cos(d_logit, d_func), forwards=forwards)
    if return_vectors:
        res.vectors = {"g": [t.detach() for t in g], "g_sam": [t.detach() for t in g_sam],
                       "g_fsam": [t.detach() for t in g_fsam],
                       "g_logit": [t.detach() for t in g_logit], "e": e}
    return res


# --------------------------------------------------------------------------- curvature operators
class _Operator:
    """A symmetric linear operator on parameter space: ``op(v) -> A v`` for a
    list of tensors ``v`` shaped like the parameters. Build with
    :func:`hvp_operator` or :func:`gnvp_operator`; call :meth:`close` (or
    use it as a context manager) to free the retained graph."""

    def __init__(self, params: TensorList, fn, loss: float):
        self.params = params
        self._fn = fn
        self.loss = loss
        self.calls = 0

    def __call__(self, v: TensorList) -> TensorList:
        self.calls += 1
        with torch.enable_grad():
            return self._fn(v)

    def close(self) -> None:
        self._fn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def hvp_operator(model: Callable, loss_fn: Callable, x, y, *,
                 params: Optional[Sequence[Tensor]] = None) -> _Operator:
    """Hessian-vector products ``H v`` of ``loss_fn(model(x), y)`` w.r.t.
    ``params`` by double backward. The forward and first backward run once
    (graph retained); each call costs one more backward. Attention layers
    use the math SDPA kernel (the fused kernels have no double backward)."""
    params, _ = _resolve_params(model, params)
    with torch.enable_grad(), _math_sdpa():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]

    def fn(v):
        out = [torch.zeros_like(p) for p in params]
        if live:
            hv = torch.autograd.grad([grads[i] for i in live], params, [v[i] for i in live],
                                     retain_graph=True, allow_unused=True)
            out = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
        return out

    return _Operator(params, fn, float(loss.item()))


def gnvp_operator(model: Callable, loss_fn: Callable, x, y, *,
                  params: Optional[Sequence[Tensor]] = None) -> _Operator:
    """Gauss-Newton-vector products ``G v = Jᵀ H_z J v`` (``H_z`` the Hessian
    of the loss in output space): ``J v`` by the double-VJP trick (the VJP
    ``Jᵀ w`` is linear in a dummy ``w``; its VJP w.r.t. ``w`` is ``J v``),
    ``H_z u`` by double backward of the loss w.r.t. the output, then one VJP.
    ``G`` is positive semi-definite for a convex loss (cross-entropy, MSE)."""
    params, _ = _resolve_params(model, params)
    with torch.enable_grad(), _math_sdpa():
        z = model(x)
        zl, spec = _leaves(z)
        zd = [t.detach().requires_grad_(True) for t in zl]
        loss = loss_fn(tree_unflatten(zd, spec), y)
        gz = torch.autograd.grad(loss, zd, create_graph=True, allow_unused=True)
        ws = [torch.zeros_like(t, requires_grad=True) for t in zl]
        jtw = torch.autograd.grad([t for t in zl if t.requires_grad],
                                  params, [w for t, w in zip(zl, ws) if t.requires_grad],
                                  create_graph=True, allow_unused=True)
    jtw_live = [(i, t) for i, t in enumerate(jtw) if t is not None and t.requires_grad]
    gz_live = [(i, t) for i, t in enumerate(gz) if t is not None and t.requires_grad]

    def fn(v):
        if not jtw_live or not gz_live:
            return [torch.zeros_like(p) for p in params]
        jv = torch.autograd.grad([t for _, t in jtw_live], ws, [v[i] for i, _ in jtw_live],
                                 retain_graph=True, allow_unused=True)
        jv = [torch.zeros_like(w) if t is None else t for w, t in zip(ws, jv)]
        hu = torch.autograd.grad([t for _, t in gz_live], zd, [jv[i] for i, _ in gz_live],
                                 retain_graph=True, allow_unused=True)
        hu = [torch.zeros_like(t) if h is None else h for t, h in zip(zd, hu)]
        return _vjp(zl, params, hu, retain=True)

    return _Operator(params, fn, float(loss.item()))


# --------------------------------------------------------------------------- spectra
def _flat(v: TensorList) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _unflat(f: Tensor, like: TensorList) -> TensorList:
    out, o = [], 0
    for p in like:
        n = p.numel()
        out.append(f[o:o + n].view_as(p).to(p.dtype))
        o += n
    return out


def lanczos(op: _Operator, iters: int = 20, seed: int = 0) -> Dict[str, Any]:
    """Extreme eigenvalues of the symmetric operator ``op`` by Lanczos with
    full reorthogonalisation (``iters`` products; exact when ``iters`` ≥ the
    number of parameters). Start vector: standard normal from
    ``torch.Generator().manual_seed(seed)``. Returns ``{"lambda_max",
    "lambda_min", "ritz" (sorted Ritz values), "iters"}``; ``lambda_max`` is
    the largest algebraic eigenvalue (not the largest magnitude).
    The Krylov basis is stored in the parameters' dtype (float32 for a
    float32 model): memory ``iters × n_params`` elements."""
    params = op.params
    n = sum(p.numel() for p in params)
    m = max(1, min(int(iters), n))
    dev = params[0].device
    dt = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(dev, dt)
    q = q / q.norm()
    Q = [q]
    alphas, betas = [], []
    for j in range(m):
        w = _flat(op(_unflat(Q[j], params))).to(dt)
        a = torch.dot(w, Q[j])
        w = w - a * Q[j] - (betas[-1] * Q[j - 1] if j > 0 else 0)
        B = torch.stack(Q)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - B.T @ (B @ w)
        alphas.append(float(a))
        b = float(w.norm())
        if j == m - 1 or b <= 1e-10 * max(1.0, max(abs(x) for x in alphas)):
            break
        betas.append(b)
        Q.append(w / b)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    return {"lambda_max": float(ritz[-1]), "lambda_min": float(ritz[0]),
            "ritz": [float(r) for r in ritz], "iters": k}


def hutchinson_trace(op: _Operator, samples: int = 20, seed: int = 0) -> Dict[str, float]:
    """Hutchinson's estimate of ``tr(A)``: the mean of ``vᵀ A v`` over
    ``samples`` Rademacher vectors ``v`` (±1, drawn from
    ``torch.Generator().manual_seed(seed)``). Returns ``{"trace", "stderr",
    "samples"}`` (stderr: standard error of the mean; 0 for one sample)."""
    params = op.params
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(max(1, int(samples))):
        v = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(p.dtype) * 2 - 1).to(p.device)
             for p in params]
        vals.append(_dot(v, op(v)))
    t = torch.tensor(vals, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
    return {"trace": float(t.mean()), "stderr": se, "samples": len(vals)}


def sharpness(model: Callable, loss_fn: Callable, x, y, *, params=None,
              lanczos_iters: int = 20, trace_samples: int = 20, seed: int = 0,
              gauss_newton: bool = False) -> Dict[str, Any]:
    """Sharpness of ``loss_fn(model(x), y)`` at the current parameters on a
    fixed batch: ``lambda_max`` / ``lambda_min`` (Lanczos, ``lanczos_iters``
    Hessian-vector products), ``trace`` ± ``trace_stderr`` (Hutchinson,
    ``trace_samples`` Rademacher vectors, fixed ``seed``), and with
    ``gauss_newton`` the same for the Gauss-Newton matrix (``gn_lambda_max``,
    ``gn_trace``, ``gn_trace_stderr``). The parameters are not modified."""
    params, _ = _resolve_params(model, params)
    out: Dict[str, Any] = {}
    devices = {p.device for p in params}
    with _same_rng(devices) as rewind:
        with hvp_operator(model, loss_fn, x, y, params=params) as H:
            lz = lanczos(H, lanczos_iters, seed)
            tr = hutchinson_trace(H, trace_samples, seed)
        out.update(lambda_max=lz["lambda_max"], lambda_min=lz["lambda_min"],
                   lanczos_iters=lz["iters"], trace=tr["trace"], trace_stderr=tr["stderr"],
                   trace_samples=tr["samples"])
        if gauss_newton:
            rewind()
            with gnvp_operator(model, loss_fn, x, y, params=params) as G:
                gl = lanczos(G, lanczos_iters, seed)
                gt = hutchinson_trace(G, trace_samples, seed)
            out.update(gn_lambda_max=gl["lambda_max"], gn_trace=gt["trace"],
                       gn_trace_stderr=gt["stderr"])
    return out


def diagnose(model: Callable, loss_fn: Callable, x, y, rho: float, *, params=None,
             optimizer=None, precondition: bool = False, with_sharpness: bool = True,
             lanczos_iters: int = 20, trace_samples: int = 20, seed: int = 0,
             gauss_newton: bool = False) -> Dict[str, Any]:
    """:func:`decompose` and (with ``with_sharpness``) :func:`sharpness` on one
    batch, as one flat dict of floats (the decomposition's fields, then
    ``lambda_max``, ``trace``, ...)."""
    out = decompose(model, loss_fn, x, y, rho, params=params, optimizer=optimizer,
                    precondition=precondition).to_dict()
    if with_sharpness:
        out.update(sharpness(model, loss_fn, x, y, params=params, lanczos_iters=lanczos_iters,
                             trace_samples=trace_samples, seed=seed, gauss_newton=gauss_newton))
    return out


# --------------------------------------------------------------------------- language models
def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy, as ``fsam-train``: logits ``(B, T, V)``,
    targets int64 ``(B, T)``; computed in float32."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def diagnose_lm(model: torch.nn.Module, optimizer, x: Tensor, y: Tensor, *,
                rho: Optional[float] = None, with_sharpness: bool = True,
                lanczos_iters: int = 10, trace_samples: int = 5, seed: int = 0,
                gauss_newton: bool = False) -> Dict[str, Any]:
    """The ``--diagnose-every`` measurement of ``fsam-train`` for a language
    model at its current step, on the batch ``(x, y)`` (use a fixed
    validation batch).

    The decomposition is measured twice: with the plain direction at
    ``rho`` (keys without prefix) and with the preconditioned direction at
    the optimizer's own radius (keys prefixed ``p_``), using the optimizer's
    ``exp_avg_sq``/``step`` (any of AdamW, SAM, FunctionalSAM). ``rho``
    defaults to the optimizer's ``rho`` (its first group), else 0.05; the
    preconditioned radius to the optimizer's ``rho`` when it preconditions,
    else 0.2 (``fsam-train``'s ``--prho`` default). Sharpness uses the model in
    eval mode; the model's train/eval mode is restored afterwards.
    Returns a flat dict of floats prefixed ``diag_``.
    """
    grp = optimizer.param_groups[0] if optimizer is not None else {}
    if rho is None:
        rho = float(grp.get("rho", 0.05)) if not grp.get("precondition", False) else 0.05
    prho = float(grp["rho"]) if grp.get("precondition", False) else 0.2
    was_training = model.training
    model.eval()
    try:
        out = diagnose(model, lm_loss, x, y, rho, optimizer=optimizer,
                       with_sharpness=with_sharpness, lanczos_iters=lanczos_iters,
                       trace_samples=trace_samples, seed=seed, gauss_newton=gauss_newton)
        if optimizer is not None:
            pre = decompose(model, lm_loss, x, y, prho, optimizer=optimizer, precondition=True)
            out.update({f"p_{k}": v for k, v in pre.to_dict().items()})
    finally:
        model.train(was_training)
    return {f"diag_{k}": v for k, v in out.items()}
