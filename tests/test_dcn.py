"""dcnv3 / dcnv4 (InternImage / FlashInternImage core ops), forward and every gradient:
against the float64 reference (cuconv/reference/dcn.py) and an independent torch oracle
written here (F.grid_sample per group with autograd; it first checks the reference
itself), in all four dtypes (the reduced-precision rule of docs/design.md §2 with the
oracle run in that dtype as the anchor), on random geometries; identities (DCNv4 ==
DCNv3 on packed input, zero offsets == the plain conv grid by unfold, offset_scale
scales the grid); the boundary rule and the floor-side derivative by hand; DCNv4's
padding channels; batch 0; wrt subsets; determinism; gradcheck through cuconv.torch;
the bad-input matrix; mutation checks (tap order, centre tap, boundary gate)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cuconv
from cuconv.ops.dcn import dcnv3, dcnv3_backward, dcnv4, dcnv4_backward
from cuconv.reference import dcn as reference
from conftest import DTYPES, assert_reduced_precision, rel_err, to_backend, to_numpy, torch_autograd


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def grid_sample_dcnv3(x, offset, mask, kernel_size, stride=1, padding=0, dilation=1, groups=1, offset_scale=1.0,
                      remove_center=False, tap_order="x_outside"):
    """An independent implementation in torch: every (group, tap) sample of the whole
    output at once with F.grid_sample (zeros padding, align_corners=False: pixel centres at
    integers, so grid = (2p + 1) / size - 1), weighted by the mask and summed over taps.
    tap_order="y_outside" is the mutation (torchvision's row-major order)."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    ho, wo = offset.shape[1:3]
    if tap_order == "x_outside":
        taps = [(i, j) for i in range(kw) for j in range(kh)]
    else:
        taps = [(i, j) for j in range(kh) for i in range(kw)]
    if remove_center:
        taps.remove((kw // 2, kh // 2))
    k = len(taps)
    d = c // groups
    ti = torch.tensor([i for i, _ in taps], dtype=x.dtype)
    tj = torch.tensor([j for _, j in taps], dtype=x.dtype)
    cx, cy = (dw * (kw - 1)) // 2, (dh * (kh - 1)) // 2
    base_x = (torch.arange(wo, dtype=x.dtype) * sw - pw + cx).reshape(1, 1, wo, 1, 1)
    base_y = (torch.arange(ho, dtype=x.dtype) * sh - ph + cy).reshape(1, ho, 1, 1, 1)
    off = offset.reshape(n, ho, wo, groups, k, 2)
    px = base_x + offset_scale * (ti * dw - cx + off[..., 0])  # [n, ho, wo, G, K]
    py = base_y + offset_scale * (tj * dh - cy + off[..., 1])
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * groups, ho, wo * k, 2)
    planes = x.reshape(n, h, w, groups, d).permute(0, 3, 4, 1, 2).reshape(n * groups, d, h, w)
    samples = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samples = samples.reshape(n, groups, d, ho, wo, k)
    m = mask.reshape(n, ho, wo, groups, k).permute(0, 3, 1, 2, 4)[:, :, None]
    y = (samples * m).sum(-1)  # [n, G, D, ho, wo]
    return y.permute(0, 3, 4, 1, 2).reshape(n, ho, wo, c)


def random_case(seed, kernel=None, remove_center=None, batch=None):
    """(x, offset, mask, params): groups 1-4, group_channels 1-8, kernels 1x1, 3x3, 5x5 or
    non-square, stride 1-2, padding 0-2, dilation 1-2, offset_scale 0.5-2, offsets of a
    few pixels (normal * 2: many points land partly or wholly outside the image)."""
    rng = np.random.default_rng(seed)
    groups, d = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    if kernel is None:
        kernel = [(1, 1), (3, 3), (5, 5), (1, 3), (3, 2), (2, 3), (3, 5)][int(rng.integers(0, 7))]
    kh, kw = kernel
    if remove_center is None:
        remove_center = bool(kh % 2 and kw % 2 and kh * kw > 1 and rng.integers(0, 2))
    stride = tuple(int(v) for v in rng.integers(1, 3, size=2))
    padding = tuple(int(v) for v in rng.integers(0, 3, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    low_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    low_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h, w = int(rng.integers(low_h, max(low_h + 2, 7))), int(rng.integers(low_w, max(low_w + 2, 7)))
    batch = int(rng.integers(1, 3)) if batch is None else batch
    params = dict(kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups,
                  offset_scale=float(rng.uniform(0.5, 2.0)), remove_center=remove_center)
    ho, wo = reference.output_size(h, w, kernel, stride, padding, dilation)
    k = kh * kw - remove_center
    x = rng.standard_normal((batch, h, w, groups * d))
    offset = rng.standard_normal((batch, ho, wo, groups * k * 2)) * 2
    mask = rng.standard_normal((batch, ho, wo, groups * k))
    return x, offset, mask, params


def oracle(x, offset, mask, gy, params, dtype="float64"):
    y, grads = torch_autograd(lambda a, b, c: grid_sample_dcnv3(a, b, c, **params), [x, offset, mask], gy, dtype)
    return [y, *grads]


def assert_close(got, want, tol, what):
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_grid_sample_oracle(seed):
    x, offset, mask, params = random_case(100 + seed)
    y = reference.dcnv3(x, offset, mask, **params)
    gy = np.random.default_rng(seed).standard_normal(y.shape)
    for got, want, name in zip([y, *reference.dcnv3_backward(gy, x, offset, mask, **params)],
                               oracle(x, offset, mask, gy, params), ("y", "input", "offset", "mask")):
        assert_close(got, want, 1e-12, f"reference {name} vs grid_sample ({params})")


CASES = [dict(kernel=(1, 1)), dict(kernel=(3, 3), remove_center=False), dict(kernel=(3, 3), remove_center=True),
         dict(kernel=(5, 5)), dict(kernel=(2, 3)), dict(kernel=(3, 1)), dict(kernel=(3, 5), remove_center=True),
         dict()]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_dcnv3_matches_reference_and_oracle(backend, case):
    x, offset, mask, params = random_case(case, **CASES[case])
    y_ref = reference.dcnv3(x, offset, mask, **params)
    gy = np.random.default_rng(case).standard_normal(y_ref.shape)
    refs = [y_ref, *reference.dcnv3_backward(gy, x, offset, mask, **params)]
    want = oracle(x, offset, mask, gy, params)
    args = [to_backend(a, backend) for a in (x, offset, mask)]
    y = dcnv3(*args, **params)
    grads = dcnv3_backward(to_backend(gy, backend), *args, **params)
    for got, r, o, name in zip([y, *grads], refs, want, ("y", "input", "offset", "mask")):
        assert_close(got, r, 1e-12, f"{name} vs reference ({params})")
        assert_close(got, o, 1e-12, f"{name} vs grid_sample oracle ({params})")


@pytest.mark.parametrize("seed", range(40, 46))
def test_random_geometries(seed):
    """Fully random cases (kernel, groups, D, stride, padding, dilation, offset_scale,
    remove_center), forward and gradients against the reference."""
    x, offset, mask, params = random_case(seed, kernel=[(1, 1), (3, 3), (5, 5), (2, 3), (3, 1), (4, 2)][seed % 6])
    y = dcnv3(x, offset, mask, **params)
    assert_close(y, reference.dcnv3(x, offset, mask, **params), 1e-12, f"y ({params})")
    gy = np.random.default_rng(seed).standard_normal(y.shape)
    for got, want, name in zip(dcnv3_backward(gy, x, offset, mask, **params),
                               reference.dcnv3_backward(gy, x, offset, mask, **params), ("input", "offset", "mask")):
        assert_close(got, want, 1e-12, f"{name} ({params})")


@pytest.mark.parametrize("groups,d", [(1, 37), (2, 32), (3, 5)])
def test_wide_groups(groups, d):
    """D above one warp's lanes (several channels per lane in the offset/mask reduction)
    and odd D."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((1, 4, 5, groups * d))
    offset = rng.standard_normal((1, 4, 5, groups * 9 * 2)) * 2
    mask = rng.standard_normal((1, 4, 5, groups * 9))
    params = dict(kernel_size=3, padding=1, groups=groups, offset_scale=0.9)
    gy = rng.standard_normal((1, 4, 5, groups * d))
    assert_close(dcnv3(x, offset, mask, **params), reference.dcnv3(x, offset, mask, **params), 1e-12, "y")
    for got, want in zip(dcnv3_backward(gy, x, offset, mask, **params),
                         reference.dcnv3_backward(gy, x, offset, mask, **params)):
        assert_close(got, want, 1e-12, "gradient")


def test_chunked_plans(monkeypatch):
    """The forward's channel chunks (a chunk boundary inside a group), tap chunks of one
    tap, and input-gradient workspace chunks of one segment give the same bits as the
    default plan."""
    from cuconv.ops import dcn as module

    rng = np.random.default_rng(7)
    groups, d, kernel = 3, 11, (3, 3)  # C = 33 channels
    x = rng.standard_normal((2, 5, 4, groups * d))
    offset = rng.standard_normal((2, 5, 4, groups * 9 * 2)) * 2
    mask = rng.standard_normal((2, 5, 4, groups * 9))
    params = dict(kernel_size=kernel, padding=1, groups=groups, offset_scale=1.3)
    gy = rng.standard_normal((2, 5, 4, groups * d))
    y0 = dcnv3(x, offset, mask, **params)
    g0 = dcnv3_backward(gy, x, offset, mask, **params)
    monkeypatch.setattr(module, "_MAX_THREADS", 16)       # 16-channel chunks: boundaries inside groups
    monkeypatch.setattr(module, "_SHARED_BUDGET_BYTES", 1)  # one tap per stage
    monkeypatch.setattr(module, "_BIN_WORKSPACE_ENTRIES", 1)  # one (batch, group) segment per chunk
    assert module.bin_chunk_segments(module.DcnGeometry(
        "t", module.Call("t", input=x, offset=offset, mask=mask), 3, kernel, 1, 1, 1, groups, 1.3, False)) == 1
    y1 = dcnv3(x, offset, mask, **params)
    g1 = dcnv3_backward(gy, x, offset, mask, **params)
    assert y1.tobytes() == y0.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(g0, g1))
    assert_close(y1, reference.dcnv3(x, offset, mask, **params), 1e-12, "chunked y")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", [1, 2, 7])
def test_reduced_precision(dtype, case):
    x, offset, mask, params = random_case(case, **CASES[case])
    assert_reduced_precision(lambda *a, **p: dcnv3(*a, **p),
                             lambda gy, *a, **p: dcnv3_backward(gy, *a, **p),
                             reference.dcnv3, reference.dcnv3_backward,
                             lambda a, b, c: grid_sample_dcnv3(a, b, c, **params),
                             [x, offset, mask], params, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_dcnv4_equals_dcnv3_on_packed_input(dtype):
    """Bit for bit, forward and gradients; the padding channels hold NaN (ignored) and get
    an exactly zero gradient."""
    x, offset, mask, params = random_case(11, kernel=(3, 3))
    g, k = params["groups"], 9 - params["remove_center"]
    channels = -(-3 * g * k // 8) * 8 + 8  # one extra block of 8 padding channels
    cast = lambda a: np.asarray(a).astype(DTYPES[dtype])  # noqa: E731
    x, offset, mask = map(cast, (x, offset, mask))
    om = reference.pack_dcnv4(offset, mask, g, k, channels)
    om[..., 3 * g * k:] = np.nan
    y3, y4 = dcnv3(x, offset, mask, **params), dcnv4(x, om, **params)
    assert y3.tobytes() == y4.tobytes()
    gy = cast(np.random.default_rng(0).standard_normal(y3.shape))
    gx3, goff, gm = dcnv3_backward(gy, x, offset, mask, **params)
    gx4, gom = dcnv4_backward(gy, x, om, **params)
    assert gx3.tobytes() == gx4.tobytes()
    want = reference.pack_dcnv4(goff, gm, g, k, channels)
    assert gom.tobytes() == want.tobytes()  # includes the exact zeros of the padding channels
    assert not np.any(np.asarray(gom[..., 3 * g * k:], np.float64))


def test_dcnv4_matches_reference(backend):
    x, offset, mask, params = random_case(5, kernel=(3, 3), remove_center=True)
    g, k = params["groups"], 8
    om = reference.pack_dcnv4(offset, mask, g, k, -(-3 * g * k // 8) * 8)
    om[..., 3 * g * k:] = np.random.default_rng(1).standard_normal(om[..., 3 * g * k:].shape)
    y_ref = reference.dcnv4(x, om, **params)
    gy = np.random.default_rng(2).standard_normal(y_ref.shape)
    y = dcnv4(to_backend(x, backend), to_backend(om, backend), **params)
    assert_close(y, y_ref, 1e-12, "dcnv4 y")
    for got, want, name in zip(dcnv4_backward(*(to_backend(a, backend) for a in (gy, x, om)), **params),
                               reference.dcnv4_backward(gy, x, om, **params), ("input", "offset_mask")):
        assert_close(got, want, 1e-12, f"dcnv4 {name}")


def unfold_aggregation(x, mask, kernel_size, stride, pad_before, dilation, groups):
    """The plain conv grid: x zero-padded by pad_before (top, left) and enough at the
    bottom/right, F.unfold (row-major taps, y outside) cropped to the mask's output size and
    reordered to DCN's x-outside tap order, weighted by the mask per group."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    ho, wo = mask.shape[1:3]
    bottom = max(0, (ho - 1) * sh + dh * (kh - 1) + 1 - h - pad_before[0])
    right = max(0, (wo - 1) * sw + dw * (kw - 1) + 1 - w - pad_before[1])
    xp = np.pad(x, ((0, 0), (pad_before[0], bottom), (pad_before[1], right), (0, 0)))
    hp, wp = xp.shape[1:3]
    ho_full, wo_full = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(torch.tensor(xp).permute(0, 3, 1, 2), (kh, kw), dilation=dilation, stride=stride)
    cols = cols.reshape(n, groups, c // groups, kh, kw, ho_full, wo_full)[..., :ho, :wo]  # tap (j: y, i: x)
    cols = cols.permute(0, 1, 2, 4, 3, 5, 6).reshape(n, groups, c // groups, kh * kw, ho, wo)  # x outside
    m = torch.tensor(mask).reshape(n, ho, wo, groups, kh * kw).permute(0, 3, 4, 1, 2)[:, :, None]
    y = (cols * m).sum(3)  # [n, G, D, ho, wo]
    return y.permute(0, 3, 4, 1, 2).reshape(n, ho, wo, c).numpy()


@pytest.mark.parametrize("kernel,dilation", [((3, 3), (1, 1)), ((2, 3), (1, 2)), ((5, 3), (2, 1))])
def test_zero_offsets_give_the_plain_conv_grid(kernel, dilation):
    rng = np.random.default_rng(3)
    n, h, w, g, d = 2, 7, 6, 2, 3
    stride, padding = (1, 2), (1, 2)
    ho, wo = reference.output_size(h, w, kernel, stride, padding, dilation)
    k = kernel[0] * kernel[1]
    x = rng.standard_normal((n, h, w, g * d))
    mask = rng.standard_normal((n, ho, wo, g * k))
    zero = np.zeros((n, ho, wo, g * k * 2))
    y = dcnv3(x, zero, mask, kernel, stride, padding, dilation, g)
    assert_close(y, unfold_aggregation(x, mask, kernel, stride, padding, dilation, g), 1e-13, "zero offsets")
    # offset_scale s scales the fixed grid too: zero offsets with s = 2 sample the plain grid
    # of dilation 2d with padding p + c before (c = (d(k-1))//2), px = ow*sw - (pw + cx) + i*2dw
    (kh, kw), (dh, dw) = kernel, dilation
    cy, cx = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    y2 = dcnv3(x, zero, mask, kernel, stride, padding, dilation, g, offset_scale=2.0)
    want = unfold_aggregation(x, mask, kernel, stride, (padding[0] + cy, padding[1] + cx), (2 * dh, 2 * dw), g)
    assert_close(y2, want, 1e-13, "zero offsets, offset_scale 2")


def test_boundary_rule_and_floor_side_derivative():
    """One group, one channel, a 1x1 kernel, one output pixel: the point is (py, px) = s*(dy, dx)."""
    x = np.arange(1.0, 13.0).reshape(1, 3, 4, 1)  # v(u, w) = 4u + w + 1
    v = lambda u, w: 4 * u + w + 1 if 0 <= u < 3 and 0 <= w < 4 else 0.0  # noqa: E731

    def run(dx, dy, m=1.5, s=1.0):
        off = np.array([dx, dy], np.float64).reshape(1, 1, 1, 2)
        msk = np.full((1, 1, 1, 1), m)
        y = dcnv3(x, off, msk, 1, stride=(3, 4), offset_scale=s)  # one output pixel, (0, 0)
        gx, goff, gm = dcnv3_backward(np.ones((1, 1, 1, 1)), x, off, msk, 1, stride=(3, 4), offset_scale=s)
        return y.item(), goff.ravel(), gm.item(), gx.ravel()

    # exactly on the gate (px = -1 or py = -1, py = H or px = W): 0 and no gradient at all
    for dx, dy in ((-1.0, 1.0), (1.0, -1.0), (1.0, 3.0), (4.0, 1.0)):
        y, goff, gm, gx = run(dx, dy)
        assert y == 0 and gm == 0 and not goff.any() and not gx.any(), (dx, dy)
    # just inside the gate: the outside corners read 0
    y, goff, gm, gx = run(-0.75, 1.0)
    assert y == pytest.approx(1.5 * 0.25 * v(1, 0))
    assert goff[0] == pytest.approx(1.5 * (v(1, 0) - 0.0))  # dS/dpx = v(1, 0) - v(1, -1)
    # an integer position: the derivative of the interpolant on [floor, floor + 1]
    y, goff, gm, gx = run(2.0, 1.0, s=2.0)  # px = 2*2 would leave; s scales dx: px = 0 + 2*2 = 4 -> out
    assert y == 0
    y, goff, gm, gx = run(1.0, 1.0, s=2.0)  # px = py = 2
    assert y == pytest.approx(1.5 * v(2, 2)) and gm == pytest.approx(v(2, 2))
    assert goff[0] == pytest.approx(2.0 * 1.5 * (v(2, 3) - v(2, 2)))  # right derivative in x
    assert goff[1] == pytest.approx(2.0 * 1.5 * (v(3, 2) - v(2, 2)))  # from the floor side in y: v(3, .) = 0
    # mutation: an ungated derivative (corners read 0, no gate) is not 0 at px = -1
    ungated = (v(1, 0) - v(1, -1))
    assert ungated != 0 and run(-1.0, 1.0)[1][0] == 0


def test_mutations_are_detected():
    """The checks above would catch a wrong tap order, centre tap or gate."""
    x, offset, mask, params = random_case(21, kernel=(3, 5), remove_center=True)
    y = dcnv3(x, offset, mask, **params)
    t = lambda a: torch.tensor(a)  # noqa: E731
    right = grid_sample_dcnv3(t(x), t(offset), t(mask), **params).numpy()
    assert rel_err(y, right) < 1e-12
    # tap order: the row-major order of torchvision differs on a non-square kernel
    swapped = grid_sample_dcnv3(t(x), t(offset), t(mask), **params, tap_order="y_outside").numpy()
    assert rel_err(y, swapped) > 1e-2
    # centre term: keeping the centre (and dropping the last tap instead) differs
    kh, kw = params["kernel_size"]
    assert reference.taps((kh, kw), True) != reference.taps((kh, kw), False)[:-1]
    k = kh * kw - 1
    g = params["groups"]
    full_off = np.concatenate([offset.reshape(*offset.shape[:3], g, k * 2),
                               np.zeros((*offset.shape[:3], g, 2))], -1).reshape(*offset.shape[:3], -1)
    full_mask = np.concatenate([mask.reshape(*mask.shape[:3], g, k), np.zeros((*mask.shape[:3], g, 1))],
                               -1).reshape(*mask.shape[:3], -1)
    kept = dcnv3(x, full_off, full_mask, **{**params, "remove_center": False})
    assert rel_err(y, kept) > 1e-2
    # gate: a reference that samples wherever a corner is inside (py > -2, ...) differs in
    # no forward value (corners outside read 0) but the oracle on gated points matches only
    # because the gate is applied; verified by hand in test_boundary_rule_and_floor_side_derivative.


def test_batch_zero_and_wrt_subsets(backend):
    x, offset, mask, params = random_case(4, kernel=(3, 3), batch=0)
    args = [to_backend(a, backend) for a in (x, offset, mask)]
    y = dcnv3(*args, **params)
    assert to_numpy(y).shape == x.shape[:1] + reference.output_size(x.shape[1], x.shape[2], (3, 3),
                                                                       params["stride"], params["padding"],
                                                                       params["dilation"]) + x.shape[3:]
    grads = dcnv3_backward(y, *args, **params)
    assert [to_numpy(g).shape for g in grads] == [a.shape for a in (x, offset, mask)]
    x, offset, mask, params = random_case(6, kernel=(3, 2))
    args = [to_backend(a, backend) for a in (x, offset, mask)]
    gy = to_backend(np.random.default_rng(0).standard_normal(to_numpy(dcnv3(*args, **params)).shape), backend)
    full = dcnv3_backward(gy, *args, **params)
    again = dcnv3_backward(gy, *args, **params)
    assert all(to_numpy(a).tobytes() == to_numpy(b).tobytes() for a, b in zip(full, again))  # deterministic
    names = ("input", "offset", "mask")
    for wrt in ("input", ("offset",), ("mask", "input"), ("offset", "mask")):
        got = dcnv3_backward(gy, *args, **params, wrt=wrt)
        for name, one, every in zip(names, got, full):
            if name in ((wrt,) if isinstance(wrt, str) else wrt):
                assert to_numpy(one).tobytes() == to_numpy(every).tobytes(), (wrt, name)
            else:
                assert one is None, (wrt, name)
    om = reference.pack_dcnv4(offset, mask, params["groups"], 6, -(-18 * params["groups"] // 8) * 8)
    gy = to_numpy(gy)
    gx, gom = dcnv4_backward(gy, x, om, **params, wrt="offset_mask")
    assert gx is None and gom is not None
    assert dcnv4_backward(gy, x, om, **params, wrt="input")[1] is None


def test_non_contiguous():
    x, offset, mask, params = random_case(8, kernel=(3, 3))
    xs = np.asfortranarray(x)
    ys = dcnv3(xs, offset[..., ::-1].copy()[..., ::-1], mask, **params)
    assert_close(ys, reference.dcnv3(x, offset, mask, **params), 1e-12, "non-contiguous")


def test_gradcheck_through_torch_adapter():
    import cuconv.torch as ct

    x, offset, mask, params = random_case(9, kernel=(3, 2), batch=1)
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, offset * 0.5, mask)]
    assert torch.autograd.gradcheck(lambda a, b, c: ct.dcnv3(a, b, c, **params), leaves)
    g, k = params["groups"], 6
    om = torch.tensor(reference.pack_dcnv4(offset * 0.5, mask, g, k, -(-3 * g * k // 8) * 8), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ct.dcnv4(a, b, **params), (leaves[0], om))
    # a plain cuconv.dcnv3 call on tensors that require grad gets autograd too
    y = cuconv.dcnv3(*leaves, **params)
    y.sum().backward()
    assert leaves[1].grad is not None


def _bad3():
    x = np.zeros((2, 5, 6, 4))
    off, m = np.zeros((2, 5, 6, 36)), np.zeros((2, 5, 6, 18))  # k=3, padding 1, groups 2
    ok = dict(kernel_size=3, padding=1, groups=2)
    return x, off, m, ok


@pytest.mark.parametrize("change,error,word", [
    (dict(groups=3), ValueError, "groups"),                          # C = 4 not divisible
    (dict(padding=0), ValueError, "spatial"),                        # offset/mask spatial size
    (dict(kernel_size=(3, 2), padding=1), ValueError, "offset"),     # wrong channel count for K
    (dict(remove_center=True), ValueError, "offset"),                # K = 8: channels mismatch
    (dict(kernel_size=2, remove_center=True), ValueError, "remove_center"),
    (dict(remove_center=1), TypeError, "remove_center"),
    (dict(offset_scale="1"), TypeError, "offset_scale"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(stride=(1, 2, 3)), TypeError, "stride"),
    (dict(groups=0), ValueError, "groups"),
])
def test_bad_parameters(change, error, word, launches):
    x, off, m, ok = _bad3()
    with pytest.raises(error, match=word):
        dcnv3(x, off, m, **{**ok, **change})
    assert not launches


@pytest.mark.parametrize("which", ["mask_channels", "offset_channels", "batch", "nchw", "rank", "dtype",
                                   "v4_not_multiple_of_8", "v4_too_few", "v4_spatial"])
def test_bad_arrays(which, launches):
    x, off, m, ok = _bad3()
    om = np.zeros((2, 5, 6, 56))
    if which == "mask_channels":
        args, error, word = (x, off, m[..., :-1]), ValueError, "mask"
    elif which == "offset_channels":
        args, error, word = (x, off[..., :-2], m), ValueError, "offset"
    elif which == "batch":
        args, error, word = (x, off[:1], m[:1]), ValueError, "batch"
    elif which == "nchw":  # the input in NCHW: its channel count no longer matches
        args, error, word = (np.zeros((2, 4, 5, 6)), off, m), ValueError, "channels|spatial"
    elif which == "rank":
        args, error, word = (x[0], off, m), ValueError, "4-D"
    elif which == "dtype":
        args, error, word = (x, off.astype(np.float32), m), TypeError, "dtype"
    elif which == "v4_not_multiple_of_8":
        args, error, word = (x, om[..., :55]), ValueError, "multiple of 8"
    elif which == "v4_too_few":
        args, error, word = (x, om[..., :48]), ValueError, "3 \\* groups \\* K"
    else:
        args, error, word = (x, om[:, :4]), ValueError, "spatial"
    op = dcnv3 if len(args) == 3 else dcnv4
    with pytest.raises(error, match=word):
        op(*args, **ok)
    backward = dcnv3_backward if len(args) == 3 else dcnv4_backward
    with pytest.raises(error, match=word):
        backward(np.zeros((2, 5, 6, 4)), *args, **ok)
    assert not launches


def test_grad_output_shape_checked(launches):
    x, off, m, ok = _bad3()
    with pytest.raises(ValueError, match="grad_output"):
        dcnv3_backward(np.zeros((2, 5, 6, 3)), x, off, m, **ok)
    assert not launches
