"""Patches at sampled positions reproduce conv2d for every geometry (groups, dilation, pads, SAME)."""

import pytest
import torch
import torch.nn.functional as F

from onnxadmm.algorithms.patches import conv_patches, resolve_conv


@pytest.mark.parametrize("geometry", [
    dict(h=9, w=7, k=(3, 3), s=(2, 1), dil=(1, 2), pads=(1, 0, 2, 1), groups=1, cin=4, cout=6, auto="NOTSET"),
    dict(h=8, w=8, k=(3, 3), s=(1, 1), dil=(1, 1), pads=(1, 1, 1, 1), groups=8, cin=8, cout=8, auto="NOTSET"),
    dict(h=8, w=8, k=(1, 1), s=(1, 1), dil=(1, 1), pads=(0, 0, 0, 0), groups=2, cin=4, cout=6, auto="NOTSET"),
    dict(h=7, w=10, k=(3, 3), s=(2, 2), dil=(1, 1), pads=(0, 0, 0, 0), groups=1, cin=3, cout=5, auto="SAME_UPPER"),
    dict(h=7, w=10, k=(4, 2), s=(2, 3), dil=(1, 1), pads=(0, 0, 0, 0), groups=1, cin=3, cout=5, auto="SAME_LOWER"),
    dict(h=6, w=6, k=(3, 3), s=(1, 1), dil=(1, 1), pads=(0, 0, 0, 0), groups=1, cin=2, cout=3, auto="VALID"),
])
def test_patches_match_conv2d(geometry):
    g = geometry
    torch.manual_seed(0)
    x = torch.randn(2, g["cin"], g["h"], g["w"])
    w = torch.randn(g["cout"], g["cin"] // g["groups"], *g["k"])
    shape = resolve_conv(g["h"], g["w"], g["k"], g["s"], g["dil"], g["pads"], g["auto"])
    top, left, bottom, right = shape.pads
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=g["s"], dilation=g["dil"], groups=g["groups"])
    assert ref.shape[2:] == (shape.out_h, shape.out_w)
    n = torch.arange(2).repeat_interleave(shape.out_h * shape.out_w)
    flat = torch.arange(shape.out_h * shape.out_w).repeat(2)
    oy, ox = flat // shape.out_w, flat % shape.out_w
    patches = conv_patches(x, g["k"], g["s"], g["dil"], shape, g["groups"], n, oy, ox)
    out = torch.einsum("pgd,grd->pgr", patches, w.reshape(g["groups"], g["cout"] // g["groups"], -1))
    torch.testing.assert_close(out.reshape(len(n), -1), ref[n, :, oy, ox], rtol=1e-4, atol=1e-4)
    if g["auto"] == "SAME_UPPER":
        assert (shape.out_h, shape.out_w) == (4, 5)
