"""Deterministic preprocessing as MONAI dictionary transforms: what is done once and cached.

Input dict: ``image`` ``(C, H, W)`` float32 in the source intensity scale (HU, or an already windowed grey
level 0..255), optional ``mask`` ``(1, H, W)``, ``spacing`` ``(dy, dx)`` mm or ``None``.
Output: ``image`` ``(C, S, S)`` float32 in [0, 1] and ``mask`` ``(1, S, S)`` uint8, S = image_size.

Chain: (volumes) resample in-plane to ``spacing_mm`` -> HU window to [0, 1] (grey images are
only rescaled: they are windowed already, windowing twice would crush them) -> crop to the lungs'
bounding box (``crop: lung``; the body's when a slice shows no lungs) or to the body's (``crop:
body``) -> pad to a square -> resize to S x S. Cropping to the lungs before shrinking gives a nodule
more pixels: on 512 px phantom slices the lungs' box spans 244-291 mm, the body's 299-332 mm
(benchmarks/RESULTS.md). Random augmentation is not here: it runs on whole batches on the training device (``lung_effnet.training.augment``). Scoring runs the same chain on
whole volumes with ``preprocess.volume.preprocess_volume`` (same values, tested).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
)

from lung_effnet.config import DataConfig
from lung_effnet.io.images2d import gray_divisor
from lung_effnet.io.planes import GRAY, HU
from lung_effnet.preprocess.volume import (
    BODY_MARGIN,
    body_threshold,
    hull,
    lung_threshold,
    plane_lung_box,
    warn_no_lungs,
    window_bounds,
)


class AboveThreshold:
    """``select_fn`` for CropForeground that pickles (a lambda would not cross to worker processes)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x):
        return x > self.threshold


class CropToBodyd(MapTransform):
    """MONAI's CropForegroundd on the body outline, skipped when a slice has no body at all
    (an empty slice above the shoulders, a blank image): cropping to nothing would leave 0 x 0."""

    def __init__(self, keys, threshold: float, margin: int = BODY_MARGIN):
        super().__init__(keys)
        self.threshold = threshold
        self.crop = CropForegroundd(keys, source_key=keys[0], select_fn=AboveThreshold(threshold), margin=margin,
                                    allow_smaller=True)

    def __call__(self, data):
        if not bool((data[self.keys[0]] > self.threshold).any()):
            return dict(data)
        return self.crop(data)


class CropToLungsd(MapTransform):
    """Crop to the bounding box of the lungs of every channel (``preprocess.volume.plane_lung_box``:
    dark regions enclosed by the body, found by threshold and connected components); where no
    channel shows lungs, crop to the body instead (``CropToBodyd``) and warn.

    ``threshold``: the lung threshold on the windowed [0, 1] scale, or ``None`` for grey images
    (each plane's Otsu threshold). The first key's image decides the box; every key is cropped to it.
    """

    def __init__(self, keys, threshold: float | None, body_threshold: float):
        super().__init__(keys)
        self.threshold = threshold
        self.body = CropToBodyd(keys, body_threshold)

    def __call__(self, data):
        image = data[self.keys[0]]
        planes = image.as_tensor().numpy() if isinstance(image, MetaTensor) else np.asarray(image)
        box = hull(plane_lung_box(plane, self.threshold) for plane in planes)
        if box is None:
            warn_no_lungs()
            return self.body(data)
        crop = SpatialCrop(roi_start=(box[0], box[2]), roi_end=(box[1], box[3]))
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class PadToSquared(MapTransform):
    """Pad the spatial dims symmetrically to a square (the larger side), so resize keeps aspect."""

    def __call__(self, data):
        d = dict(data)
        side = max(d[self.keys[0]].shape[1:])
        return SpatialPadd(self.keys, spatial_size=(side, side), mode="constant", value=0.0)(d)


def preprocess_chain(cfg: DataConfig, intensity: str, with_mask: bool, resample: bool) -> Compose:
    """The MONAI chain for one intensity scale (``"HU"`` or ``"gray"``); see the module docstring."""
    key = (tuple(sorted(vars(cfg).items())), intensity, with_mask, resample)
    if key not in _CHAINS:
        _CHAINS[key] = _build_chain(cfg, intensity, with_mask, resample)
    return _CHAINS[key]


_CHAINS: dict = {}


def _build_chain(cfg: DataConfig, intensity: str, with_mask: bool, resample: bool) -> Compose:
    keys = ["image", "mask"] if with_mask else ["image"]
    modes_interp = ("bilinear", "nearest")[: len(keys)]
    modes_resize = ("area", "nearest-exact")[: len(keys)]
    steps: list[MapTransform] = []
    if resample and cfg.spacing_mm and intensity == HU:
        steps.append(Spacingd(keys, pixdim=(cfg.spacing_mm, cfg.spacing_mm), mode=modes_interp))
    low, high = window_bounds(cfg, intensity)
    steps.append(ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    if cfg.crop == "lung":
        steps.append(CropToLungsd(keys, lung_threshold(cfg, intensity), body_threshold(cfg, intensity)))
    elif cfg.crop == "body":
        steps.append(CropToBodyd(keys, body_threshold(cfg, intensity)))
    steps += [
        PadToSquared(keys),
        Resized(keys, spatial_size=(cfg.image_size, cfg.image_size), mode=modes_resize),
        EnsureTyped(keys, data_type="tensor", track_meta=False),
    ]
    return Compose(steps)


def preprocess_sample(image: np.ndarray, intensity: str, cfg: DataConfig, mask: np.ndarray | None = None,
                      spacing: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the chain on one sample.

    Args:
        image: ``(C, H, W)`` float32, HU or grey 0..255 (12- and 16-bit grey is scaled to 0..255
            first, ``io.images2d.gray_divisor``).
        intensity: ``"HU"`` or ``"gray"``.
        mask: optional ``(1, H, W)`` lesion mask (> 0 inside).
        spacing: ``(dy, dx)`` mm, for resampling volumes; ``None`` skips resampling.

    Returns:
        ``(image, mask)``: ``(C, S, S)`` float32 in [0, 1] and ``(1, S, S)`` uint8 (or ``None``).
    """
    image = np.asarray(image, dtype=np.float32)
    divisor = gray_divisor(float(image.max(initial=0))) if intensity == GRAY else None
    if divisor is not None:
        image = image / divisor  # 12- or 16-bit grey to the 8-bit scale
    affine = np.diag([spacing[0], spacing[1], 1.0, 1.0]) if spacing else np.eye(4)
    data = {"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine))}
    if mask is not None:
        data["mask"] = MetaTensor(torch.from_numpy((np.asarray(mask) > 0).astype(np.float32)), affine=torch.as_tensor(affine))
    out = preprocess_chain(cfg, intensity, mask is not None, resample=spacing is not None)(data)
    image_out = out["image"].float().clamp_(0.0, 1.0)
    mask_out = (out["mask"] > 0.5).to(torch.uint8) if mask is not None else None
    return image_out, mask_out
