"""cuconv: hand-written CUDA kernels for convolution variants, forward and backward,
on arrays from CuPy, PyTorch, JAX or NumPy (through DLPack, without copies).

Host arrays run on the `interpret` backend (the same .cu sources compiled for the
CPU); CUDA arrays on the `cuda` backend (NVRTC through cupy.RawModule).
CUCONV_BACKEND=interpret|cuda forces one.

Every op of the registry (cuconv/_registry.py) is public here as OP and OP_backward.
OP follows its inputs: torch tensors that require grad (grad mode on) get autograd through
cuconv.torch, JAX tracers go through cuconv.jax (cuconv/_dispatch.py).
"""

from . import ops as _ops  # imports every op module, which registers its ops
from ._dispatch import follow_inputs as _follow_inputs
from ._interpret import SanitizerError  # raised by CUCONV_SANITIZE's checks (docs/sanitize.md)
from ._registry import OPS as _OPS
from .ops.conv2d import conv_output_size

__version__ = "0.1.0"

globals().update({name: _follow_inputs(name, opdef.forward) for name, opdef in _OPS.items()})
globals().update({name + "_backward": opdef.backward for name, opdef in _OPS.items()})
__all__ = [*_OPS, *(name + "_backward" for name in _OPS), "conv_output_size", "__version__"]
