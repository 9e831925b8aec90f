"""Algorithm tables: the kernels that can compute a conv-shaped op, picked by name or by
algorithm='auto'.

An algorithm declares its name, `supported(geom, dtype)` (None, or a phrase completing
"supports only ..."), its entry points and its place in 'auto''s order. The module that
owns the kernels registers the algorithm into the table of the op it serves (conv2d's
CONV2D; dynamic_conv2d's DYNAMIC), so the op dispatches through the table and never
imports its backends:

  forward(call, geom)                           -> the op's result (exported)
  gradients(call, geom, wanted, has_bias)       -> (grad_input, grad_weight, grad_bias)
  passes: Passes(forward, grad_input, grad_weight), the three conv passes on explicit
          operands, for the ops built from them (conv_transpose2d, subpixel_conv2d)

'auto' untuned takes the first supported candidate: those with a `rank`, lowest first,
with any whose `preferred(geom)` holds moved to the front (for the pass algorithms, their
Passes' own `preferred`: the passes are other kernels than the op's entry points). With
CUCONV_AUTOTUNE=1 on a GPU it times the supported candidates (cuconv/_autotune.py). An
algorithm without a rank (one that changes the precision contract, e.g. TF32) runs only
when named.

Tensor cores: an algorithm declared with tensor_cores=True is a candidate only on a
device whose fragment probes passed (cuconv/_probes.py: tensor_cores_verified), so
neither the untuned order nor the autotuner picks it where the mma layouts are unproven.
Named, it always runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import _autotune, _probes


@dataclass(frozen=True)
class Passes:
    forward: Callable      # (call, geom, x, w, bias, y)
    grad_input: Callable   # (call, geom, grad_y, w, bias, grad_x)
    grad_weight: Callable  # (call, geom, grad_y, x, grad_w)
    preferred: Callable | None = None  # (geom) -> True moves these passes to the front of 'auto''s pass order


@dataclass(frozen=True)
class Algorithm:
    name: str
    supported: Callable               # (geom, dtype) -> None, or why not
    forward: Callable | None = None
    gradients: Callable | None = None
    passes: Passes | None = None
    rank: int | None = None           # place in 'auto''s order; None: only when named
    preferred: Callable | None = None  # (geom) -> True moves it to the front of 'auto''s order
    zero_channels: bool = False       # runs a conv with no input or output channels (torch's edge case)
    tensor_cores: bool = False        # 'auto' considers it only where the fragment probes passed

    def why_not(self, geom, dtype: str) -> str | None:
        """None when it can run this conv in `dtype`, else a phrase completing "supports only"."""
        if not self.zero_channels and min(geom.in_channels, geom.out_channels) == 0:
            return (f"convolutions with input and output channels (got in_channels={geom.in_channels}, "
                    f"out_channels={geom.out_channels}; algorithm='direct' takes none)")
        return self.supported(geom, dtype)

    def check(self, op: str, geom, dtype: str) -> None:
        """ValueError naming this algorithm when it cannot run this conv in `dtype`."""
        refuse_unsupported(op, self.name, self.why_not(geom, dtype))


def refuse_unsupported(op: str, algorithm: str, why: str | None) -> None:
    """ValueError "OP: algorithm='NAME' supports only WHY" unless `why` is None."""
    if why is not None:
        raise ValueError(f"{op}: algorithm={algorithm!r} supports only {why}")


class AlgorithmTable:
    """The algorithms of one op, by name, in the order of 'auto''s candidates."""

    def __init__(self, op: str):
        self.op = op
        self._entries: dict[str, Algorithm] = {}

    def register(self, algorithm: Algorithm) -> Algorithm:
        if algorithm.name in self._entries:
            raise ValueError(f"{self.op}: algorithm {algorithm.name!r} is registered twice")
        self._entries[algorithm.name] = algorithm
        return algorithm

    def names(self, passes: bool = False) -> tuple[str, ...]:
        """Every algorithm (with passes=True: those with explicit-operand passes), ranked
        ones first in rank order, then the named-only ones alphabetically."""
        entries = [a for a in self._entries.values() if a.passes is not None or not passes]
        ordered = sorted(entries, key=lambda a: (a.rank is None, a.rank or 0, a.name))
        return tuple(a.name for a in ordered)

    def __getitem__(self, name: str) -> Algorithm:
        return self._entries[name]

    def check(self, op: str, algorithm, geom, dtype: str, passes: bool = False) -> str:
        """`algorithm` itself, or 'auto'; ValueError for an unknown one or one that cannot
        run this conv (before anything is launched)."""
        if algorithm == "auto":
            return algorithm
        names = self.names(passes)
        if not isinstance(algorithm, str) or algorithm not in names:
            raise ValueError(f"{op}: algorithm must be 'auto' or one of {names}, got {algorithm!r}")
        self._entries[algorithm].check(op, geom, dtype)
        return algorithm

    def candidates(self, geom, dtype: str, passes: bool = False, call=None) -> list[str]:
        """The supported algorithms 'auto' may take, its untuned choice first. Tensor-core
        algorithms are among them only when `call`'s device passed the fragment probes
        (asked only when one would otherwise be a candidate); without a call they are not."""
        ranked = [self._entries[n] for n in self.names(passes) if self._entries[n].rank is not None]
        ranked.sort(key=lambda a: not _preferred(a, geom, passes))  # stable: keeps rank order
        supported = [a for a in ranked if a.why_not(geom, dtype) is None]
        if any(a.tensor_cores for a in supported) and not (call is not None and _probes.tensor_cores_verified(call)):
            supported = [a for a in supported if not a.tensor_cores]
        return [a.name for a in supported]

    def resolve(self, call, key: str, geom, algorithm: str, run: Callable, passes: bool = False) -> str:
        """A checked `algorithm`, or for 'auto' the untuned choice or (tuned) the fastest
        candidate measured with run(name) (cuconv/_autotune.py)."""
        if algorithm != "auto":
            return algorithm
        return _autotune.choose(call, key, self.candidates(geom, call.dtype, passes, call), run)


def _preferred(algorithm: Algorithm, geom, passes: bool) -> bool:
    rule = algorithm.passes.preferred if passes else algorithm.preferred
    return rule is not None and rule(geom)
