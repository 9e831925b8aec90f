"""cuconv benchmarks: `python -m bench [--quick] [--op conv2d] [--dtype float32,...]
[--json PATH] [--repeats N]` from the repository root.

First a self-check of every op against the float64 reference (always: the interpret
backend, plus the cuda backend when a GPU is usable), then, on a CUDA GPU only, timings
against the baselines with JSON results under bench/results/. One module per op family;
a new one is added to SUITES.
"""

from . import conv2d, conv_transpose2d, deform_conv, dynamic_conv, involution, pixel_shuffle, separable, spectral, subpixel

SUITES = [conv2d, conv_transpose2d, subpixel, pixel_shuffle, separable, involution, deform_conv, dynamic_conv,
          spectral]
