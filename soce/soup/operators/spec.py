"""The operator registry and :class:`MergeSpec`, an operator with its parameters (no torch here)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Operator:
    """What an operator does, as mergekit 0.1.5's generalized task arithmetic describes it.

    ``needs_base``: works on task vectors ``M_j - base``; ``sparsify``: None, ``"magnitude"`` (TIES' trim)
    or ``"random"`` (DARE's drop); ``consensus``: TIES' sign election; ``normalize``/``rescale``: defaults;
    ``params``: the parameter names it takes (others are refused)."""

    name: str
    needs_base: bool
    sparsify: str | None
    consensus: bool
    normalize: bool
    rescale: bool
    params: tuple[str, ...]


_TV = ("density", "lambda", "normalize", "rescale")
OPERATORS: dict[str, Operator] = {
    "linear": Operator("linear", False, None, False, True, False, ("normalize",)),
    "task_arithmetic": Operator("task_arithmetic", True, None, False, False, False, ("lambda", "normalize")),
    "ties": Operator("ties", True, "magnitude", True, True, False, _TV),
    "dare_linear": Operator("dare_linear", True, "random", False, False, True, (*_TV, "seed")),
    "dare_ties": Operator("dare_ties", True, "random", True, False, True, (*_TV, "seed")),
}


def get_operator(name: str) -> Operator:
    """The registered operator ``name``; ValueError (one line) naming the known ones otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"merge method {name!r}: unknown (use one of {', '.join(OPERATORS)})") from None


@dataclass(frozen=True)
class MergeSpec:
    """An operator and its parameters. ``density``: fraction of each task vector kept (TIES: the largest
    magnitudes, DARE: at random), in [0, 1]; ``lam`` (``lambda``): scale of the mixed task vector;
    ``normalize``: divide by the sum of the weights (TIES: of the weights agreeing in sign, per element);
    None takes the operator's default; ``rescale``: scale each sparsified task vector back to its L1 norm
    (None: the operator's default); ``seed``: DARE's masks (int >= 0)."""

    method: str = "linear"
    density: float = 1.0
    lam: float = 1.0
    normalize: bool | None = None
    rescale: bool | None = None
    seed: int = 0

    @property
    def op(self) -> Operator:
        return get_operator(self.method)

    @property
    def needs_base(self) -> bool:
        return self.op.needs_base

    @property
    def do_normalize(self) -> bool:
        return self.op.normalize if self.normalize is None else bool(self.normalize)

    @property
    def do_rescale(self) -> bool:
        return self.op.rescale if self.rescale is None else bool(self.rescale)

    def problem(self) -> str | None:
        """One line saying what is wrong with the parameters, or None."""
        if self.method not in OPERATORS:
            return f"merge method {self.method!r}: unknown (use one of {', '.join(OPERATORS)})"
        if (
            isinstance(self.density, bool)
            or not isinstance(self.density, (int, float))
            or not 0.0 <= self.density <= 1.0
        ):
            return f"density: {self.density!r} must be a number in [0, 1]"
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            return f"lambda: {self.lam!r} must be a finite number"
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            return f"seed: {self.seed!r} must be an integer >= 0"
        for name in ("normalize", "rescale"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                return f"{name}: {v!r} must be true or false"
        return None

    def params(self) -> dict[str, Any]:
        """The parameters that this operator uses, resolved (defaults filled in), by mergekit's names."""
        vals = {
            "density": float(self.density),
            "lambda": float(self.lam),
            "normalize": self.do_normalize,
            "rescale": self.do_rescale,
            "seed": int(self.seed),
        }
        return {"method": self.method, **{k: vals[k] for k in self.op.params}}

    @staticmethod
    def from_mapping(d: Mapping[str, Any]) -> MergeSpec:
        """From ``{"method": ..., "density": ..., "lambda": ..., ...}`` (``lam`` or ``lambda``); parameters the
        operator does not take must be absent or None (ValueError otherwise, one line)."""
        given = {("lam" if k == "lambda" else str(k)): v for k, v in d.items() if v is not None}
        known = {f.name for f in fields(MergeSpec)}
        bad = sorted(set(given) - known)
        if bad:
            raise ValueError(
                f"merge: unknown parameter {bad[0]!r} (known: method, density, lambda, normalize, rescale, seed)"
            )
        spec = MergeSpec(**given)
        op = get_operator(spec.method)
        extra = [k for k in given if k != "method" and ("lambda" if k == "lam" else k) not in op.params]
        if extra:
            name = "lambda" if extra[0] == "lam" else extra[0]
            raise ValueError(f"merge method {spec.method!r} takes no {name!r} (it takes: {', '.join(op.params)})")
        return spec
