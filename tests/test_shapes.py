"""cuconv._registry: every op is registered once with what its adapters need, its output
shape from shapes alone equals the shape of its real result, and a bad shape raises the
op's own error."""

import inspect

import numpy as np
import pytest

import cuconv
from cuconv import _registry
from cuconv._registry import OPS

EXAMPLES = [(op, i) for op, opdef in sorted(OPS.items()) for i in range(len(opdef.examples))]


def example_arrays(op: str, index: int, rng) -> tuple[dict, dict]:
    """(arrays by name, None for absent ones, in the op's order; params) of an example."""
    opdef = OPS[op]
    example = opdef.examples[index]
    made = {}
    for name in opdef.arrays:
        shape = example.shapes.get(name)
        made[name] = None if shape is None else rng.standard_normal(shape)
        if shape is not None and name in opdef.complex_arrays:
            made[name] = made[name] + 1j * rng.standard_normal(shape)
    return made, dict(example.params)


def test_every_public_op_is_registered_with_an_example():
    exported = {name for name in cuconv.__all__ if not name.endswith("_backward")}
    assert set(OPS) == exported - {"conv_output_size", "__version__"}
    for name, opdef in OPS.items():
        assert opdef.examples, f"{name} has no example"
        assert getattr(cuconv, name).__wrapped__ is opdef.forward  # the plain call, following its inputs
        assert getattr(cuconv, name + "_backward") is opdef.backward
        backward = inspect.signature(opdef.backward).parameters
        assert list(backward)[0] == "grad_output" and "wrt" in backward
        for example in opdef.examples:
            assert set(example.shapes) == set(opdef.arrays), f"{name}: an example names every array"


def test_keyword_and_optional_arrays_come_from_the_signature():
    assert OPS["deform_conv2d"].keyword_arrays == ("mask",)
    assert OPS["deform_conv2d"].optional == ("bias", "mask")
    assert OPS["conv2d"].keyword_arrays == () and OPS["conv2d"].optional == ("bias",)
    assert OPS["spectral_filter2d"].complex_arrays == ("filter",)


@pytest.mark.parametrize("op,index", EXAMPLES)
def test_output_shape_matches_the_op(op, index):
    arrays, params = example_arrays(op, index, np.random.default_rng(0))
    keyword = {n: arrays.pop(n) for n in OPS[op].keyword_arrays}
    result = getattr(cuconv, op)(*arrays.values(), **keyword, **params)
    shapes = {n: None if a is None else a.shape for n, a in {**arrays, **keyword}.items()}
    assert _registry.output_shape(op, shapes, **params) == result.shape


def test_bad_shape_raises_the_ops_error():
    with pytest.raises(ValueError, match=r"input has 4 channels but weight expects"):
        _registry.output_shape("conv2d", dict(input=(2, 4, 9, 8), weight=(6, 3, 3, 3)))
    with pytest.raises(KeyError, match="no array arguments"):
        _registry.output_shape("conv2d", dict(image=(2, 4, 9, 8)))
    with pytest.raises(KeyError, match="no op 'conv9d'"):
        _registry.output_shape("conv9d", {})


def test_a_registration_is_checked():
    opdef = OPS["conv2d"]
    with pytest.raises(ValueError, match="registered twice"):
        _registry.register_op(opdef)

    def conv9d(input, stride=1):
        return input

    with pytest.raises(ValueError, match="is not 'conv9d_backward'"):
        _registry.register_op(_registry.OpDef(conv9d, opdef.backward, ("input",), opdef.output_shape))
    with pytest.raises(ValueError, match=r"arrays \['weight'\] not in its signature"):
        _registry.register_op(_registry.OpDef(conv9d, opdef.backward, ("input", "weight"), opdef.output_shape))
    assert "conv9d" not in OPS
