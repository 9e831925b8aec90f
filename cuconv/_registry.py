"""The op registry: each op module declares its ops here, once, and everything that
lists ops iterates it: the public namespace (cuconv.OP, cuconv.OP_backward), the shape
functions the framework adapters trace with, the torch and JAX adapters, the bench's op
names and the tests' completeness checks.

An op is declared by its forward and backward functions plus what cannot be read off
their signatures:

    register_op(OpDef(conv2d, conv2d_backward, arrays=("input", "weight", "bias"),
                      output_shape=_output_shape, examples=(Example(...),)))

From the forward's signature come the op's name, which arrays are optional (default
None), which are passed by keyword (an array after a parameter: deform_conv2d's mask),
the parameters and their defaults; `output_shape` is called with every parameter
filled in, so it never repeats a default.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable


class ShapeArgs:
    """Stands in for an op's Call in its geometry checks: the arguments' shapes only."""

    def __init__(self, **shapes):
        self._shapes = {n: None if s is None else tuple(int(v) for v in s) for n, s in shapes.items()}

    def shape(self, name: str):
        return self._shapes.get(name)


@dataclass(frozen=True)
class Example:
    """A small call of an op with every array present: shapes by array name, parameters.
    Generic tests (shapes, torch and JAX adapters) run every example of every op."""

    shapes: dict
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OpDef:
    forward: Callable
    backward: Callable
    arrays: tuple[str, ...]           # the array arguments, in the forward's order
    output_shape: Callable            # (op, ShapeArgs, **every parameter) -> the result's shape
    examples: tuple[Example, ...] = ()
    complex_arrays: tuple[str, ...] = ()  # complex arguments (complex64 pairs with float32 arrays)
    autocast: bool = True             # torch autocast casts its floating arguments (not for pure data movement)
    # Arrays the op is not affine in (deform_conv2d's offset). In every other array the op
    # is affine, so its higher-order derivatives are its own forward and backward on
    # substituted arguments (cuconv.torch, cuconv.jax); through these they are refused.
    nonlinear: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.forward.__name__

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.forward)

    @property
    def optional(self) -> tuple[str, ...]:
        """Array arguments that may be None."""
        return tuple(a for a in self.arrays if self.signature.parameters[a].default is None)

    @property
    def keyword_arrays(self) -> tuple[str, ...]:
        """Array arguments that stand after a parameter in the forward, so a caller passes
        them by keyword."""
        names = list(self.signature.parameters)
        first_param = min((names.index(p) for p in self.params), default=len(names))
        return tuple(a for a in self.arrays if names.index(a) > first_param)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p in self.signature.parameters if p not in self.arrays)

    def param_defaults(self) -> dict:
        return {p: self.signature.parameters[p].default for p in self.params}


OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    """Adds an op; its forward's parameters must include every array and the backward
    must be named after it."""
    name = opdef.name
    if name in OPS:
        raise ValueError(f"op {name!r} is registered twice")
    missing = [a for a in opdef.arrays if a not in opdef.signature.parameters]
    if missing or opdef.backward.__name__ != name + "_backward":
        raise ValueError(f"op {name!r}: arrays {missing} not in its signature, or backward "
                         f"{opdef.backward.__name__!r} is not {name + '_backward'!r}")
    OPS[name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no op {name!r}; the ops are {sorted(OPS)}") from None


def output_shape(op: str, shapes: dict, **params) -> tuple[int, ...]:
    """The shape of op(...)'s result for array arguments of these shapes (name -> shape,
    None or absent for an absent optional array) and these parameters (defaults filled
    in from the forward's signature). Runs the op's own geometry checks, so a bad shape
    raises the error the op would raise."""
    opdef = get_op(op)
    unknown = set(shapes) - set(opdef.arrays)
    if unknown:
        raise KeyError(f"{op}: no array arguments {sorted(unknown)}; it has {opdef.arrays}")
    values = {**opdef.param_defaults(), **params}
    unbatched = shapes.get("input") is not None and len(shapes["input"]) == getattr(opdef.forward, "unbatched_rank", -1)
    if unbatched:  # one sample without its batch dimension (cuconv.ops._common.accepts_unbatched)
        shapes = {**shapes, "input": (1, *shapes["input"])}
    shape = tuple(int(v) for v in opdef.output_shape(op, ShapeArgs(**shapes), **values))
    return shape[1:] if unbatched else shape
