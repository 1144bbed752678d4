"""Per-block sampling strategies, and the paper's ``[Stack-GS-J-Else]`` notation.

A :class:`Strategy` gives every flow block (in *forward* block order) a solver method and
an initial guess.  The GS-Jacobi paper (Liu & Qin 2025) writes strategies as
``[Stack-GS-J-Else]``:

* ``Stack``: the block(s) that get GS-Jacobi modules, e.g. ``6`` or ``0/7``;
* ``GS``: the number of modules for each of those blocks, e.g. ``8`` or ``256/8``
  (a single value applies to every stacked block);
* ``J``: the maximum Jacobi iterations per module for each of those blocks (likewise);
* ``Else``: the maximum Jacobi iterations for every other block.

So ``[0/7-256/8-1/13-6]`` gives block 0 256 modules of at most 1 iteration, block 7 8
modules of at most 13 iterations, and the other blocks plain Jacobi capped at 6.

:func:`select_strategy` implements the paper's rule from a CRM / IGM table.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fixedpoint as fp

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import BlockMetrics

__all__ = ["BlockPlan", "InitialGuess", "Strategy", "select_strategy"]


class InitialGuess(enum.Enum):
    """Start of the iteration for a block with output (noise) ``z`` (permuted order)."""

    NOISE = "z"  # x0 = z
    ZEROS_AFTER_FIRST = "zeros"  # x0 = z at position 0 (exact there), 0 elsewhere




@dataclass(frozen=True)
class BlockPlan:
    """How one block is inverted: a fixedpoint method and an initial guess."""

    method: fp.Method
    init: InitialGuess = InitialGuess.NOISE

    def __post_init__(self) -> None:
        if not isinstance(self.method, fp.Method):
            raise TypeError(f"method must be a fixedpoint method, got {self.method!r}")
        if not isinstance(self.init, InitialGuess):
            raise TypeError(f"init must be an InitialGuess, got {self.init!r}")

    def describe(self) -> str:
        return f"{_method_text(self.method)}, init {self.init.value}"


def _method_text(m: fp.Method) -> str:
    return m.describe()


_SPEC = re.compile(r"^\[([^\[\]]*)\]$")


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
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}")
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

        ``atol`` / ``rtol`` go to every method (default None: stop at the rounding level;
        0 lets the iteration caps and finite termination decide, as the paper's runs did).
        ``init`` is one initial guess for all blocks or one per block (forward order).
        """
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
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
        names = ("Stack", "GS", "J", "Else")
        lists = []
        for name, text in zip(names, fields):
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
        if len(set(stack)) != len(stack):
            raise ValueError(f"strategy {spec!r}: a block is listed twice in Stack")
        for b in stack:
            if b >= blocks:
                raise ValueError(
                    f"strategy {spec!r}: block index {b} out of range for {blocks} blocks"
                )
        for name, values in (("GS", gs), ("J", jmax), ("Else", other)):
            if any(v < 1 for v in values):
                raise ValueError(f"strategy {spec!r}: {name} values must be positive")
        for g in gs:
            if g > seq_len:
                raise ValueError(
                    f"strategy {spec!r}: {g} modules exceed the sequence length T={seq_len}"
                )
        inits = _inits(init, blocks)
        methods: list[fp.Method] = [
            fp.Jacobi(atol=atol, rtol=rtol, max_iter=other[0]) for _ in range(blocks)
        ]
        for b, g, j in zip(stack, gs, jmax):
            methods[b] = fp.GSJacobi(modules=g, max_iter=j, atol=atol, rtol=rtol)
        return cls(tuple(BlockPlan(mt, it) for mt, it in zip(methods, inits)))

    def to_spec(self) -> str | None:
        """The ``[Stack-GS-J-Else]`` notation, or None if the strategy has no such form.

        Representable: GS-Jacobi blocks with a module count and a cap, every other block
        plain Jacobi with one shared cap, and one shared tolerance.  The initial guesses
        are not part of the notation.
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


def _inits(init: InitialGuess | Sequence[InitialGuess], blocks: int) -> list[InitialGuess]:
    if isinstance(init, InitialGuess):
        return [init] * blocks
    inits = list(init)
    if len(inits) != blocks:
        raise ValueError(f"init lists {len(inits)} initial guesses for {blocks} blocks")
    return inits


def select_strategy(
    table: Sequence[BlockMetrics],
    *,
    seq_len: int,
    modules: int = 8,
    gs_max_iter: int = 32,
    jacobi_max_iter: int = 10,
    threshold: float = 1.5,
    igm: str = "paper",
    atol: float | None = None,
    rtol: float | None = None,
) -> Strategy:
    """The paper's rule: split CRM-dominant blocks into modules, pick starts by IGM.

    A block is *dominant* when its CRM share exceeds ``threshold`` times the uniform
    share ``100 / K`` percent (default 1.5x: with 8 blocks, above 18.75 %; the published
    tables have one or two blocks at 33-75 % and the rest below 11 %).  Dominant blocks
    get ``GSJacobi(modules, gs_max_iter)``; the others ``Jacobi(jacobi_max_iter)``.
    Every block starts from the candidate with the smaller IGM (``igm="paper"``: the
    norm of the batch-mean error, as published; ``"sample"``: the mean per-sample
    norm); ties and non-finite values favour the noise start.
    """
    K = len(table)
    if K == 0:
        raise ValueError("the metrics table is empty")
    if igm not in ("paper", "sample"):
        raise ValueError(f"igm must be 'paper' or 'sample', got {igm!r}")
    if not 1 <= modules <= seq_len:
        raise ValueError(f"modules must be in [1, seq_len={seq_len}], got {modules}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    cut = threshold * 100.0 / K
    plans = []
    for row in table:
        if row.crm_percent > cut:
            method: fp.Method = fp.GSJacobi(modules=modules, max_iter=gs_max_iter, atol=atol,
                                            rtol=rtol)
        else:
            method = fp.Jacobi(atol=atol, rtol=rtol, max_iter=jacobi_max_iter)
        noise = _finite_or_inf(getattr(row, f"igm_{igm}_noise"))
        zeros = _finite_or_inf(getattr(row, f"igm_{igm}_zeros"))
        init = InitialGuess.ZEROS_AFTER_FIRST if zeros < noise else InitialGuess.NOISE
        plans.append(BlockPlan(method, init))
    return Strategy(tuple(plans))


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf
