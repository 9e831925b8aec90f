"""Plain cuconv functions follow their inputs: torch tensors that need autograd go
through cuconv.torch, JAX tracers (jit, grad, vmap) through cuconv.jax; everything else
(NumPy, CuPy, concrete JAX arrays, torch without grad) takes the plain call.

The check reads only the arguments' type names, so `import cuconv` imports neither torch
nor jax and a NumPy or CuPy call pays a few type lookups.
"""

from __future__ import annotations

import functools
import itertools


def _adapter(values):
    """'torch', 'jax' or None: the adapter these arguments need."""
    for value in values:
        module = type(value).__module__
        if module.startswith("torch"):
            import torch

            if value.requires_grad and torch.is_grad_enabled():
                return "torch"
        elif module.startswith("jax"):
            import jax

            if isinstance(value, jax.core.Tracer):
                return "jax"
    return None


def follow_inputs(name: str, function):
    """cuconv.NAME: `function`, or the same op of the adapter its inputs need."""

    @functools.wraps(function)
    def public(*args, **kwargs):
        adapter = _adapter(itertools.chain(args, kwargs.values()))
        if adapter == "torch":
            from . import torch as adapter_module
        elif adapter == "jax":
            from . import jax as adapter_module
        else:
            return function(*args, **kwargs)
        return getattr(adapter_module, name)(*args, **kwargs)

    return public
