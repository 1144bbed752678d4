"""One iteration driver for every method.

Jacobi, GS-Jacobi and triangular Anderson are all "modules solved in order, each by a
triangular iteration": Jacobi is one module.  Inside a module each sample keeps a
pointer ``p``: positions before it are frozen.  After every iteration a position freezes
once all the inputs it was just computed from had settled; the first unfrozen position
always qualifies (its inputs were frozen), hence at most ``width`` iterations per module.

Sequential is the same thing with ``T`` modules of width one, run by a lean loop because
it is the baseline of every speed-up.  Anderson mixes positions, loses the triangular
structure, and has its own loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .causality import check_causal
from .maps import IncrementalMap, as_incremental
from .methods import Anderson, GSJacobi, Jacobi, Method, Sequential, TriangularAnderson
from .precision import _check_tolerance, compute_dtype
from .result import Result, SolveError, Status, TraceRow

__all__ = ["solve"]


def solve(
    F: Callable[[Tensor], Tensor] | IncrementalMap,
    x0: Tensor,
    method: Method,
    *,
    throw: bool = False,
    trace: bool = False,
    reference: Tensor | None = None,
    check_causality: bool = False,
) -> Result:
    """Solve the strictly causal system ``x = F(x)`` starting from ``x0``.

    Args:
        F: a callable on ``(B, T, d)`` tensors, strictly causal along dimension 1, or an
            :class:`~fixedpoint.IncrementalMap` that can evaluate windows from a cache.
        x0: initial guess, shape ``(B, T, d)``, floating point, finite; never modified.
        method: a method object, e.g. ``Jacobi(tol=1e-6)``.
        throw: raise :class:`SolveError` when the status is not SUCCESS instead of
            returning the result with that status.
        trace: record one :class:`TraceRow` per iteration.
        reference: the known solution; with ``trace`` each row records the error to it.
        check_causality: probe ``F`` at a few positions before solving (a handful of
            extra evaluations, not counted in the cost) and raise
            :class:`NonCausalError` if it looks ahead.  :func:`check_causal` does the
            complete check.

    A positive ``tol`` (or ``rtol``) below the rounding noise of the dtype the
    arithmetic runs in (``x0.dtype``, or the autocast dtype if coarser; see
    :func:`fixedpoint.noise_floor`) cannot be met; such a method triggers a
    :class:`~fixedpoint.PrecisionWarning` but is used as given.
    """
    _check_inputs(x0, method, reference)
    # Warn only, never change the method: adjusting is the caller's decision
    # (fixedpoint.meaningful_tolerance, tarflow.reverse's adjust_tolerance).
    _check_tolerance(method, compute_dtype(x0), scale=1.0, adjust=False)
    fmap = as_incremental(F)
    length = x0.shape[1]
    if check_causality:
        check_causal(fmap, x0, positions={0, length // 2, length - 1})
    run = _Run(fmap, x0, trace, reference)
    start = time.perf_counter()
    with torch.no_grad():
        if isinstance(method, Anderson):
            _anderson(run, method)
        elif isinstance(method, Sequential):
            _sequential(run)
        else:
            edges, cap, tol, rtol = _plan(method, length)
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                stepper = (
                    _TriangularAndersonStep(method, run, lo, hi)
                    if isinstance(method, TriangularAnderson)
                    else None
                )
                _solve_module(run, i, lo, hi, cap or (hi - lo), tol, rtol, stepper)
    if run.x.is_cuda:
        torch.cuda.synchronize(run.x.device)
    result = run.result(time.perf_counter() - start)
    if throw and result.status is not Status.SUCCESS:
        raise SolveError(result)
    return result


def _check_inputs(x0: Tensor, method: Method, reference: Tensor | None) -> None:
    if not isinstance(method, (Sequential, Jacobi, GSJacobi, Anderson, TriangularAnderson)):
        raise TypeError(
            "method must be one of fp.Sequential, fp.Jacobi, fp.GSJacobi, fp.Anderson, "
            f"fp.TriangularAnderson; got {type(method).__name__}"
        )
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.ndim != 3:
        raise ValueError(f"x0 must have shape (B, T, d), got {tuple(x0.shape)}")
    if min(x0.shape) < 1:
        raise ValueError(f"x0 must be non-empty in every dimension, got {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    bad = int((~torch.isfinite(x0)).sum())
    if bad:
        raise ValueError(f"x0 has {bad} non-finite entries; the initial guess must be finite")
    if reference is not None:
        if not isinstance(reference, Tensor) or reference.shape != x0.shape:
            got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference)
            raise ValueError(f"reference must have the shape of x0 {tuple(x0.shape)}, got {got}")


def _plan(method: Method, length: int) -> tuple[tuple[int, ...], int | None, float, float]:
    """Module edges, per-module iteration cap (None: the width), tol, rtol."""
    if isinstance(method, GSJacobi):
        return method.boundaries(length), method.max_iter, method.tol, method.rtol
    if isinstance(method, (Jacobi, TriangularAnderson)):
        return (0, length), method.max_iter, method.tol, method.rtol
    raise AssertionError(method)


class _Run:
    """The iterate, the map's state and the running cost statistics of one solve."""

    def __init__(self, fmap: IncrementalMap, x0: Tensor, trace: bool, reference: Tensor | None):
        self.fmap = fmap
        self.x = x0.clone()  # our own buffer: the caller's tensor is never written
        self.batch, self.length, self.dim = x0.shape
        self.state = fmap.init_state(self.x)
        self.status = [Status.SUCCESS] * self.batch
        self.sample_iterations = torch.zeros(self.batch, dtype=torch.long)
        self.module_iterations: list[int] = []
        self.dependent_steps = 0
        self.token_evals = 0
        self.rows: list[TraceRow] | None = [] if trace else None
        self.reference = reference

    def evaluate(self, lo: int, hi: int) -> Tensor:
        """``F(x)[:, lo:hi]``, committing the frozen prefix, with cost accounting."""
        committed = self.fmap.committed(self.state)
        self.token_evals += self.batch * self.fmap.positions_read(committed, lo, hi, self.length)
        self.dependent_steps += 1
        f = self.fmap.advance(self.state, self.x, lo, hi)
        expected = (self.batch, hi - lo, self.dim)
        if not isinstance(f, Tensor):
            raise TypeError(f"the map returned {type(f).__name__}, expected a torch.Tensor")
        if tuple(f.shape) != expected:
            raise ValueError(
                f"the map returned shape {tuple(f.shape)} for positions {lo}:{hi}, "
                f"expected {expected}"
            )
        if f.dtype != self.x.dtype or f.device != self.x.device:
            raise TypeError(
                f"the map returned {f.dtype} on {f.device}, expected {self.x.dtype} on "
                f"{self.x.device} (the dtype and device of x0)"
            )
        return f

    def fail(self, samples: Tensor) -> None:
        for b in samples.nonzero().flatten().tolist():
            self.status[b] = Status.NONFINITE

    def cap_reached(self, samples: Tensor) -> None:
        for b in samples.nonzero().flatten().tolist():
            if self.status[b] is Status.SUCCESS:
                self.status[b] = Status.MAX_ITER

    def alive(self) -> Tensor:
        return torch.tensor([s is not Status.NONFINITE for s in self.status], device=self.x.device)

    def record(self, module: int, iteration: int, residual: Tensor) -> None:
        if self.rows is None:
            return
        error = None
        if self.reference is not None:
            error = (self.x - self.reference).abs().flatten(1).amax(1).cpu()
        self.rows.append(TraceRow(module, iteration, residual.cpu(), error))

    def result(self, wall_time: float) -> Result:
        worst = max(self.status, key=lambda s: s.value)
        converged = torch.tensor([s is Status.SUCCESS for s in self.status])
        # A sample reported converged must be finite everywhere: guard the contract.
        converged &= torch.isfinite(self.x).flatten(1).all(1).cpu()
        return Result(
            x=self.x,
            converged=converged,
            status=worst,
            sample_status=tuple(self.status),
            iterations=sum(self.module_iterations),
            module_iterations=tuple(self.module_iterations),
            dependent_steps=self.dependent_steps,
            token_evals=self.token_evals,
            wall_time=wall_time,
            trace=tuple(self.rows) if self.rows is not None else None,
            sample_iterations=tuple(self.sample_iterations.tolist()),
        )


def _sequential(run: _Run) -> None:
    """Forward substitution with as little per-step overhead as the map allows.

    This is the baseline every speed-up is measured against, so it skips the module
    bookkeeping: one map call and one copy per position, one finiteness check at the end.
    """
    for t in range(run.length):
        f = run.evaluate(t, t + 1)
        tracing = run.rows is not None
        change = (f - run.x[:, t : t + 1]).abs().flatten(1).amax(1) if tracing else None
        run.x[:, t : t + 1] = f
        run.module_iterations.append(1)
        if change is not None:
            run.record(t, 1, change)
    run.sample_iterations += run.length
    # A non-finite value poisons every later position of its sample; report the sample.
    run.fail(~torch.isfinite(run.x).flatten(1).all(1).cpu())


def _settled(x_old: Tensor, x_new: Tensor, tol: float, rtol: float) -> Tensor:
    """Per (sample, position): every component's update met the tolerance."""
    return ((x_new - x_old).abs() <= tol + rtol * x_new.abs()).all(-1)


def _solve_module(
    run: _Run,
    module: int,
    lo0: int,
    hi: int,
    cap: int,
    tol: float,
    rtol: float,
    stepper: _TriangularAndersonStep | None,
) -> None:
    device = run.x.device
    positions = torch.arange(lo0, hi, device=device)
    # p[b]: positions of sample b before p[b] are frozen; failed samples are frozen whole.
    p = torch.where(run.alive(), lo0, hi)
    iterations = 0
    while iterations < cap and bool((p < hi).any()):
        active = p < hi
        lo = int(p[active].min())
        f = run.evaluate(lo, hi)
        iterations += 1
        run.sample_iterations += active.cpu().long()
        window = positions[lo - lo0 :]
        unfrozen = window[None, :] >= p[:, None]
        first = window[None, :] == p[:, None]

        broken = ((~torch.isfinite(f)).any(-1) & unfrozen).any(1)
        if broken.any():
            run.fail(broken)
            p = torch.where(broken, hi, p)
            unfrozen &= ~broken[:, None]
            first &= ~broken[:, None]

        x_old = run.x[:, lo:hi]
        proposal = f if stepper is None else stepper.propose(x_old, f, lo, unfrozen, first)
        # A position is final once every input it was just computed from had settled
        # (plain-step residual within tolerance): so the first unsettled position still
        # freezes (its inputs did not move), and everything after it waits, because it
        # was computed from an input that just moved.  The first unfrozen position always
        # freezes: that is the finite-termination argument.  Frozen positions take the
        # plain value F(x), which is exact given their inputs, never a mixed step.
        keeps_moving = unfrozen & ~_settled(x_old, f, tol, rtol)
        stop = torch.where(keeps_moving.any(1), lo + keeps_moving.int().argmax(1) + 1, hi)
        stop = torch.where(active & ~broken, stop, p)
        freezing = unfrozen & (window[None, :] < stop[:, None])
        x_new = torch.where(unfrozen[..., None], proposal, x_old)
        x_new = torch.where(freezing[..., None], f, x_new)
        residual = (x_new - x_old).abs().amax(-1).amax(-1)
        run.x[:, lo:hi] = x_new
        p = stop
        run.record(module, iterations, residual)
    run.cap_reached((p < hi).cpu())
    run.module_iterations.append(iterations)


class _TriangularAndersonStep:
    """ParaTAA update: per-position mixing coefficients fitted on the causal prefix."""

    def __init__(self, method: TriangularAnderson, run: _Run, lo0: int, hi: int):
        self.memory = method.memory
        self.ridge = method.ridge
        self.lo0 = lo0
        shape = (run.batch, hi - lo0, run.dim, method.memory)
        self.dX = run.x.new_zeros(shape)
        self.dR = run.x.new_zeros(shape)
        self.filled = 0
        self.slot = 0
        self.prev_x: Tensor | None = None
        self.prev_r: Tensor | None = None

    def propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        with _own_precision(x):
            return self._propose(x, f, lo, unfrozen, first)

    def _propose(self, x: Tensor, f: Tensor, lo: int, unfrozen: Tensor, first: Tensor) -> Tensor:
        r = f - x
        off = lo - self.lo0
        if self.prev_x is not None:
            self.dX[:, off:, :, self.slot] = x - self.prev_x[:, off:]
            self.dR[:, off:, :, self.slot] = r - self.prev_r[:, off:]
            self.slot = (self.slot + 1) % self.memory
            self.filled = min(self.filled + 1, self.memory)
        self.prev_x = torch.cat([x.new_zeros(x.shape[0], off, x.shape[2]), x], 1)
        self.prev_r = torch.cat([r.new_zeros(r.shape[0], off, r.shape[2]), r], 1)
        if self.filled == 0:
            return f
        dX, dR = self.dX[:, off:], self.dR[:, off:]
        live = unfrozen[..., None, None].to(x.dtype)
        # Causal prefix sums over the unfrozen positions: position t sees s <= t only.
        gram = torch.cumsum(live * dR.transpose(-1, -2) @ dR, dim=1)
        rhs = torch.cumsum(live * (dR.transpose(-1, -2) @ r[..., None]), dim=1)[..., 0]
        eye = torch.eye(self.memory, dtype=x.dtype, device=x.device)
        unused = torch.arange(self.memory, device=x.device) >= self.filled
        scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / self.memory
        regular = gram + (_ridge(self.ridge, x.dtype) * scale + torch.finfo(x.dtype).tiny) * eye
        # Empty history slots get an identity row and a zero right-hand side: gamma = 0.
        regular = torch.where(unused[:, None] | unused[None, :], eye, regular)
        rhs = torch.where(unused, 0.0, rhs)
        gamma, info = torch.linalg.solve_ex(regular, rhs)
        mixed = x + r - ((dX + dR) @ gamma[..., None])[..., 0]
        # Singular or overflowing least squares: that position takes the plain step.
        fallback = first[..., None] | ~torch.isfinite(mixed) | (info != 0)[..., None]
        return torch.where(fallback, f, mixed)


def _anderson(run: _Run, method: Anderson) -> None:
    """Type-II Anderson acceleration over the whole sequence, per sample, safeguarded."""
    B, N, m = run.batch, run.length * run.dim, method.memory
    beta = method.damping
    device = run.x.device
    dX = run.x.new_zeros(B, m, N)
    dG = run.x.new_zeros(B, m, N)
    filled = torch.zeros(B, dtype=torch.long, device=device)
    slot = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    # The last accepted iterate and its residual: differences are taken against them.
    prev_x = torch.zeros(B, N, dtype=run.x.dtype, device=device)
    prev_g = torch.zeros_like(prev_x)
    has_prev = torch.zeros(B, dtype=torch.bool, device=device)
    mixed_last = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    iterations = 0
    while iterations < method.max_iter and bool(active.any()):
        f = run.evaluate(0, run.length).reshape(B, N)
        iterations += 1
        run.sample_iterations += active.cpu().long()
        x = run.x.reshape(B, N)
        g = f - x
        finite = torch.isfinite(f).all(1)
        norm = torch.linalg.vector_norm(torch.where(finite[:, None], g, 0.0), dim=1)
        prev_norm = torch.linalg.vector_norm(prev_g, dim=1)
        # Safeguard: a mixed step that overflowed or grew the residual is rejected.
        reject = active & mixed_last & (~finite | (norm > method.growth * prev_norm))
        failed = active & ~finite & ~reject
        run.fail(failed.cpu())
        accept = active & finite & ~reject
        done = accept & (g.abs() <= method.tol + method.rtol * f.abs()).all(1)
        go_on = accept & ~done

        push = go_on & has_prev
        dX[rows[push], slot[push]] = (x - prev_x)[push]
        dG[rows[push], slot[push]] = (g - prev_g)[push]
        slot = torch.where(push, (slot + 1) % m, slot)
        filled = torch.where(push, torch.clamp(filled + 1, max=m), filled)
        filled = torch.where(reject, 0, filled)

        plain = x + beta * g
        with _own_precision(x):
            gamma = _anderson_coefficients(dG, g, filled, method.ridge)
            mixed = plain - ((dX + beta * dG).transpose(1, 2) @ gamma[..., None])[..., 0]
        usable = (filled > 0) & torch.isfinite(mixed).all(1)
        filled = torch.where(go_on & ~usable, 0, filled)

        new_x = torch.where(done[:, None], f, x)
        new_x = torch.where(go_on[:, None], torch.where(usable[:, None], mixed, plain), new_x)
        new_x = torch.where(reject[:, None], prev_x + beta * prev_g, new_x)
        residual = (new_x - x).abs().amax(1)

        prev_x = torch.where(go_on[:, None], x, prev_x)
        prev_g = torch.where(go_on[:, None], g, prev_g)
        has_prev |= go_on
        mixed_last = go_on & usable
        active &= ~done & ~failed
        run.x = new_x.reshape(B, run.length, run.dim)
        run.record(0, iterations, residual)
    run.cap_reached(active.cpu())
    run.module_iterations.append(iterations)


def _anderson_coefficients(dG: Tensor, g: Tensor, filled: Tensor, ridge: float) -> Tensor:
    """Ridge least squares ``min |g - dG^T gamma|^2 + ridge*scale*|gamma|^2`` per sample."""
    m = dG.shape[1]
    gram = dG @ dG.transpose(1, 2)
    rhs = (dG @ g[..., None])[..., 0]
    eye = torch.eye(m, dtype=g.dtype, device=g.device)
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / m
    regular = gram + (_ridge(ridge, g.dtype) * scale + torch.finfo(g.dtype).tiny) * eye
    unused = torch.arange(m, device=g.device)[None, :] >= filled[:, None]
    mask = unused[:, :, None] | unused[:, None, :]
    regular = torch.where(mask, eye, regular)
    rhs = torch.where(unused, 0.0, rhs)
    gamma, info = torch.linalg.solve_ex(regular, rhs)
    # A singular system gives non-finite coefficients, so the caller takes the plain step.
    return torch.where((info != 0)[:, None], torch.nan, gamma)


def _ridge(ridge: float, dtype: torch.dtype) -> float:
    """The relative ridge, never below what the dtype can resolve."""
    return max(ridge, 16 * torch.finfo(dtype).eps)


def _own_precision(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off for the solver's own least squares: they run in the iterate dtype.

    Autocast is meant for the map ``F``; under it the history products would come out in
    bfloat16/float16, losing the precision the mixing needs, and ``linalg.solve`` rejects
    the mixed dtypes outright (Anderson crashed under CPU bf16 autocast).
    """
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # device types without autocast
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()
