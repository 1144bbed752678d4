"""Per-block sampling strategies, and the paper's ``[Stack-GS-J-Else]`` notation.

A :class:`Strategy` gives every flow block (in *forward* block order) a solver method and
an initial guess.  Any :class:`fixedpoint.Method` works, including one written outside
the package.  The GS-Jacobi paper (Liu & Qin 2025) writes strategies as
``[Stack-GS-J-Else]``:

* ``Stack``: the block(s) that get GS-Jacobi modules, e.g. ``6`` or ``0/7``;
* ``GS``: the number of modules for each of those blocks, e.g. ``8`` or ``256/8``
  (a single value applies to every stacked block);
* ``J``: the maximum Jacobi iterations per module for each of those blocks (likewise);
* ``Else``: the maximum Jacobi iterations for every other block.

So ``[0/7-256/8-1/13-6]`` gives block 0 256 modules of at most 1 iteration, block 7 8
modules of at most 13 iterations, and the other blocks plain Jacobi capped at 6.

The paper's rule that picks a strategy from the CRM / IGM diagnostics is
:func:`fixedpoint.tarflow.diagnostics.select_strategy`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import fixedpoint as fp

__all__ = ["BlockPlan", "InitialGuess", "Objective", "Strategy"]


class InitialGuess(enum.Enum):
    """Start of the iteration for a block with output (noise) ``z`` (permuted order)."""

    NOISE = "z"  # x0 = z
    ZEROS_AFTER_FIRST = "zeros"  # x0 = z at position 0 (exact there), 0 elsewhere

    def start(self, z: Tensor) -> Tensor:
        """The initial iterate for block output ``z`` ``(B, T, d)``; ``z`` is not modified."""
        if self is InitialGuess.NOISE:
            return z
        x0 = torch.zeros_like(z)
        x0[:, :1] = z[:, :1]  # position 0 is known exactly: x_0 = z_0
        return x0


class Objective(enum.Enum):
    """What an automatic strategy minimises within its deviation budget.

    ``LATENCY``: the fewest dependent steps (sequential network calls), ties broken by
    the fewest token evaluations: the figure of merit on a latency-bound device (an
    accelerator at small batch, the paper's setting), where a call costs about the same
    whatever its width.  ``WALLCLOCK``: the shortest predicted wall-clock on the device
    at hand, from a measured cost model (on a CPU a wide call costs its width).
    ``Objective("latency")`` parses the command-line spelling.
    """

    LATENCY = "latency"
    WALLCLOCK = "wallclock"

    def key(self, steps: int, tokens: int, seconds: float | None) -> tuple[float, ...]:
        """Sort key of a candidate (smaller is better); ``seconds`` is the predicted
        wall-clock, needed by ``WALLCLOCK`` only."""
        if self is Objective.LATENCY:
            return (float(steps), float(tokens))
        if seconds is None:
            raise ValueError("the wallclock objective needs a predicted time per candidate")
        return (seconds,)


@dataclass(frozen=True)
class BlockPlan:
    """How one block is inverted: a fixedpoint method and an initial guess."""

    method: fp.Method
    init: InitialGuess = InitialGuess.NOISE

    def __post_init__(self) -> None:
        if not isinstance(self.method, fp.Method):
            raise TypeError(f"method must be a fixedpoint.Method, got {self.method!r}")
        if not isinstance(self.init, InitialGuess):
            raise TypeError(f"init must be an InitialGuess, got {self.init!r}")

    def describe(self) -> str:
        return f"{self.method.describe()}, init {self.init.value}"


_SPEC = re.compile(r"^\[([^\[\]]*)\]$")
_FIELDS = ("Stack", "GS", "J", "Else")


@dataclass(frozen=True)
class _Notation:
    """The four fields of ``[Stack-GS-J-Else]``, GS and J expanded to one per stacked
    block."""

    stack: list[int]
    modules: list[int]
    caps: list[int]
    else_cap: int


@dataclass(frozen=True)
class Strategy:
    """One :class:`BlockPlan` per flow block, in forward block order."""

    plans: tuple[BlockPlan, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.plans, tuple) or not self.plans:
            raise ValueError("a strategy needs a non-empty tuple of block plans")
        for k, p in enumerate(self.plans):
            if not isinstance(p, BlockPlan):
                raise TypeError(f"plans[{k}] must be a BlockPlan, got {type(p).__name__}")

    @property
    def blocks(self) -> int:
        return len(self.plans)

    @classmethod
    def uniform(
        cls, method: fp.Method, blocks: int, init: InitialGuess = InitialGuess.NOISE
    ) -> Strategy:
        """The same method and initial guess for every block."""
        _check_positive("blocks", blocks)
        return cls(tuple(BlockPlan(method, init) for _ in range(blocks)))

    @classmethod
    def parse(
        cls,
        spec: str,
        blocks: int,
        seq_len: int,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        init: InitialGuess | Sequence[InitialGuess] = InitialGuess.NOISE,
    ) -> Strategy:
        """Parse the paper notation ``[Stack-GS-J-Else]`` for a ``blocks``-block model.

        ``atol`` / ``rtol`` go to every method (default None: stop at the rounding level
        of the iterate; 0 lets the iteration caps and finite termination decide, as the
        paper's runs did).  ``init`` is one initial guess for all blocks or one per block
        (forward order).
        """
        _check_positive("blocks", blocks)
        _check_positive("seq_len", seq_len)
        notation = _read_notation(spec)
        _check_notation(spec, notation, blocks, seq_len)
        inits = _inits(init, blocks)
        methods: list[fp.Method] = [
            fp.Jacobi(atol=atol, rtol=rtol, max_iter=notation.else_cap) for _ in range(blocks)
        ]
        for b, g, j in zip(notation.stack, notation.modules, notation.caps):
            methods[b] = fp.GSJacobi(modules=g, max_iter=j, atol=atol, rtol=rtol)
        return cls(tuple(BlockPlan(mt, it) for mt, it in zip(methods, inits)))

    def to_spec(self) -> str | None:
        """The ``[Stack-GS-J-Else]`` notation, or None if the strategy has no such form.

        Representable: GS-Jacobi blocks with a module count and a cap, every other block
        plain Jacobi with one shared cap, and one shared tolerance.  The initial guesses
        are not part of the notation.  (The notation names two methods; any other method
        is a valid strategy that simply has no spec.)
        """
        stack, other, tols = [], set(), set()
        for k, p in enumerate(self.plans):
            m = p.method
            if isinstance(m, fp.GSJacobi) and isinstance(m.modules, int) and m.max_iter:
                stack.append((k, m.modules, m.max_iter))
            elif isinstance(m, fp.Jacobi) and m.max_iter is not None:
                other.add(m.max_iter)
            else:
                return None
            if isinstance(m.atol, Tensor) or isinstance(m.rtol, Tensor):
                return None
            tols.add((m.atol, m.rtol))
        if len(tols) != 1 or len(other) > 1 or not stack:
            return None
        else_cap = other.pop() if other else 1
        cols = []
        for i in range(3):
            values = [str(s[i]) for s in stack]
            # Shared GS / J values are written once, as the paper does.
            cols.append(values[0] if i and len(set(values)) == 1 else "/".join(values))
        return f"[{cols[0]}-{cols[1]}-{cols[2]}-{else_cap}]"

    def describe(self) -> str:
        """One line per block, forward order."""
        return "\n".join(f"block {k}: {p.describe()}" for k, p in enumerate(self.plans))

    def __str__(self) -> str:
        spec = self.to_spec()
        if spec is None:
            return "; ".join(f"{k}: {p.describe()}" for k, p in enumerate(self.plans))
        odd = [str(k) for k, p in enumerate(self.plans) if p.init is not InitialGuess.NOISE]
        return spec + (f" (init zeros: blocks {','.join(odd)})" if odd else "")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _read_notation(spec: str) -> _Notation:
    """The four fields of ``spec`` as integer lists (syntax only)."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}")
    m = _SPEC.match(spec.replace(" ", ""))
    if m is None:
        raise ValueError(
            f"strategy {spec!r} must be of the form [Stack-GS-J-Else] in square brackets"
        )
    fields = m.group(1).split("-")
    if len(fields) != 4:
        raise ValueError(
            f"strategy {spec!r} needs 4 '-'-separated fields (Stack-GS-J-Else), "
            f"got {len(fields)}"
        )
    lists = []
    for name, text in zip(_FIELDS, fields):
        items = text.split("/")
        if any(not it.isdigit() for it in items):
            raise ValueError(
                f"strategy {spec!r}: field {name} must be '/'-separated non-negative "
                f"integers, got {text!r}"
            )
        lists.append([int(it) for it in items])
    stack, gs, jmax, other = lists
    if len(other) != 1:
        raise ValueError(f"strategy {spec!r}: field Else must be a single number")
    # A single GS or J value applies to every stacked block ("[0/6-8-32-20]").
    for name, values in (("GS", gs), ("J", jmax)):
        if len(values) not in (1, len(stack)):
            raise ValueError(
                f"strategy {spec!r}: {name} lists {len(values)} entries for "
                f"{len(stack)} stacked block(s); give one value or one per block"
            )
    gs = gs * len(stack) if len(gs) == 1 else gs
    jmax = jmax * len(stack) if len(jmax) == 1 else jmax
    return _Notation(stack, gs, jmax, other[0])


def _check_notation(spec: str, n: _Notation, blocks: int, seq_len: int) -> None:
    """Meaning: block indices exist and are distinct, counts positive, modules <= T."""
    if len(set(n.stack)) != len(n.stack):
        raise ValueError(f"strategy {spec!r}: a block is listed twice in Stack")
    for b in n.stack:
        if b >= blocks:
            raise ValueError(
                f"strategy {spec!r}: block index {b} out of range for {blocks} blocks"
            )
    for name, values in (("GS", n.modules), ("J", n.caps), ("Else", [n.else_cap])):
        if any(v < 1 for v in values):
            raise ValueError(f"strategy {spec!r}: {name} values must be positive")
    for g in n.modules:
        if g > seq_len:
            raise ValueError(
                f"strategy {spec!r}: {g} modules exceed the sequence length T={seq_len}"
            )


def _inits(init: InitialGuess | Sequence[InitialGuess], blocks: int) -> list[InitialGuess]:
    if isinstance(init, InitialGuess):
        return [init] * blocks
    inits = list(init)
    if len(inits) != blocks:
        raise ValueError(f"init lists {len(inits)} initial guesses for {blocks} blocks")
    return inits
