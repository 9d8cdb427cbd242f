"""``area_resize_half``: torch's area resize as float16, bit for bit, by a faster route on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lung_effnet.preprocess import area_resize
from lung_effnet.preprocess.area_resize import FAST_MIN_OUTPUTS, adaptive_windows, area_resize_half


def _reference(planes: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(planes[None], size=(size, size), mode="area")[0].half()


def _windowed_ct(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``(n, H, W)`` float32 in [0, 1] as the chain makes them: whole HU through a lung window, clipped
    at both ends (so runs of exact 0 and 1 too)."""
    gen = torch.Generator().manual_seed(seed)
    hu = torch.randint(-1100, 900, (n, height, width), generator=gen).float()
    return ((hu + 1000.0) / 1500.0).clamp(0.0, 1.0)


@pytest.mark.parametrize("height, width, size", [(225, 225, 224), (301, 301, 224), (390, 390, 224), (447, 447, 224),
                                                 (512, 512, 224), (700, 640, 224), (1024, 1000, 96), (224, 300, 96),
                                                 (97, 97, 96), (150, 131, 64), (40, 57, 96)])
def test_equals_torch_s_area_resize_bit_for_bit(height, width, size):
    fast = -(-FAST_MIN_OUTPUTS // (size * size))  # planes enough for the fast route
    for planes in (_windowed_ct(1, height, width, seed=height), _windowed_ct(fast, height, width, seed=height),
                   torch.rand(fast + 3, height, width)):
        got = area_resize_half(planes, size)
        assert got.dtype == torch.float16 and got.shape == (len(planes), size, size)
        assert torch.equal(got, _reference(planes, size))
        assert torch.equal(area_resize._fast_area_resize_half(planes, size), got)  # whatever route was taken
        assert torch.equal(area_resize_half(planes, size, nonnegative=True), got)  # the caller's promise: no check


def test_inputs_outside_the_fast_route_s_conditions_get_torch_s_kernel():
    """Negative values (the error bound needs one sign), another dtype (the bound is float32's) and a 1 x 1
    output (torch takes the mean there, in another order): the fast route would differ (seen), the
    function does not."""
    gen = torch.Generator().manual_seed(1)
    for planes, size in ((torch.randn(4, 390, 390, generator=gen), 224), (torch.rand(4, 390, 390, generator=gen).half(), 224),
                         (torch.rand(40, 256, 256, generator=torch.Generator().manual_seed(1)), 1)):
        assert torch.equal(area_resize_half(planes, size), F.interpolate(planes[None], (size, size), mode="area")[0].half())


def test_the_fast_pass_alone_is_not_exact_and_the_recomputed_pixels_make_it_so(monkeypatch):
    """Without the recomputation next to float16 rounding boundaries some pixels would differ by one
    float16 step: the exactness above is the second step's doing, not luck."""
    planes = torch.rand(4, 390, 390, generator=torch.Generator().manual_seed(0))
    recomputed = []
    real = area_resize._reference_means

    def spy(*args):
        means = real(*args)
        recomputed.append(len(means))
        return means

    assert not torch.equal(area_resize._separable_means(planes, 224).half(), _reference(planes, 224))  # the separable pass alone misses some
    monkeypatch.setattr(area_resize, "_reference_means", spy)
    assert torch.equal(area_resize_half(planes, 224), _reference(planes, 224))
    assert 0 < recomputed[0] < 0.05 * 4 * 224 * 224  # a few percent at most: the fast pass does the rest

    monkeypatch.setattr(area_resize, "_reference_means", lambda planes, plane, *_: torch.full((len(plane),), -1.0))
    marked = area_resize_half(planes, 224)
    differs = marked != _reference(planes, 224)
    assert differs.any() and (marked[differs] == -1).all()  # exactly the recomputed pixels: the rest is right


def test_windows_are_torch_s():
    for n_in, n_out in ((390, 224), (224, 224), (100, 7), (7, 3)):
        starts, lengths = adaptive_windows(n_in, n_out)
        x = torch.arange(n_in, dtype=torch.float64)
        means = F.adaptive_avg_pool1d(x[None, None], n_out)[0, 0]
        expected = torch.stack([x[s:s + k].mean() for s, k in zip(starts.tolist(), lengths.tolist())])
        assert torch.allclose(means, expected) and int(starts[-1] + lengths[-1]) == n_in
