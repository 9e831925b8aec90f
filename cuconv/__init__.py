"""cuconv: hand-written CUDA kernels for convolution variants, forward and backward,
on arrays from CuPy, PyTorch, JAX or NumPy (through DLPack, without copies).

Host arrays run on the `interpret` backend (the same .cu sources compiled for the
CPU); CUDA arrays on the `cuda` backend (NVRTC through cupy.RawModule).
CUCONV_BACKEND=interpret|cuda forces one.
"""

from .ops import *  # noqa: F403  (every op and its backward)
from .ops import __all__ as _ops

__version__ = "0.1.0"
__all__ = [*_ops, "__version__"]
