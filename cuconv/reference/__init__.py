"""float64 NumPy ground truth for every op, forward and backward (clarity over speed).

One module per op family, named as in cuconv/ops/: `from cuconv.reference import conv2d`
is the module, whose `conv2d` and `conv2d_backward` are the functions.
"""
