"""A phantom family the project's generator did not make: a transfer check for the training recipe.

Writes IQ-OTH/NCCD-style JPG folders (``Bengin cases/``, ``Malignant cases/``, ``Normal cases/``) of
512 px slices with a window baked in, plus ``manifest.csv`` (``path,label,patient_id``), from a
deliberately different, much simpler drawing than ``lung_effnet.synthetic.phantom``: elliptical body and
lungs with per-patient field of view, blob-and-streak vessels, smooth noise texture, no table, no
ribs, a grey (not black) background outside the body, and lesions drawn as thresholded smooth noise
(malignant 18-30 mm with a ground-glass rim, benign 6-11 mm, a third calcified). Nothing here is
shared with the project's generator but numpy; its HU values, textures and positions differ.

    python benchmarks/other_family.py OUT [--patients 60] [--seed 0]
    lung-effnet train --config demo_cpu --data OUT/manifest.csv --out RUN
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

FOLDER = {"benign": "Bengin", "malignant": "Malignant", "normal": "Normal"}
SIZE = 512


def smooth_noise(rng, shape, sigma_px):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px)
    return field / (field.std() + 1e-9)


def draw_patient(rng, label: str, n_slices: int) -> list[np.ndarray]:
    """``n_slices`` HU slices (512 x 512) through one patient's lesion (or lungs)."""
    fov = rng.uniform(340, 420)  # mm across the image
    pix = fov / SIZE
    yy, xx = (np.mgrid[:SIZE, :SIZE] - SIZE / 2) * pix  # mm from the centre
    body_a, body_b = rng.uniform(140, 175), rng.uniform(95, 125)
    lung_a, lung_b, gap = body_a * rng.uniform(0.32, 0.4), body_b * rng.uniform(0.6, 0.75), rng.uniform(18, 35)
    lung_hu = rng.uniform(-880, -780)
    texture = smooth_noise(rng, (SIZE, SIZE), rng.uniform(2, 6)) * rng.uniform(15, 35)
    vessels = np.zeros((SIZE, SIZE))
    for _ in range(int(rng.integers(60, 140))):  # dots and short streaks, 1-5 mm
        cy, cx = rng.uniform(-lung_b, lung_b), rng.uniform(-body_a * 0.8, body_a * 0.8)
        r, length, angle = rng.uniform(0.5, 2.5), rng.uniform(0, 15), rng.uniform(0, np.pi)
        t = np.clip(((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / max(length, 1e-3), 0, 1) * length
        d = np.hypot(xx - cx - t * np.cos(angle), yy - cy - t * np.sin(angle))
        vessels = np.maximum(vessels, d < r)
    if label == "malignant":
        radius, core, rim = rng.uniform(9, 15), rng.uniform(10, 60), rng.uniform(2, 5)
    elif label == "benign":
        radius, core, rim = rng.uniform(3, 5.5), (rng.uniform(300, 700) if rng.random() < 1 / 3 else rng.uniform(0, 50)), 0.0
    side = rng.choice([-1, 1])
    lesion_c = (rng.uniform(-0.4, 0.4) * lung_b, side * (gap / 2 + lung_a * rng.uniform(0.7, 1.3)))
    shape_noise = smooth_noise(rng, (SIZE, SIZE), 4 / pix)
    slices = []
    for k in range(n_slices):
        z = (k - (n_slices - 1) / 2) * rng.uniform(2.0, 4.0)  # mm from the lesion's centre plane
        hu = np.full((SIZE, SIZE), -1000.0)
        body = (xx / body_a) ** 2 + (yy / body_b) ** 2 <= 1
        hu[body] = 30.0 + smooth_noise(rng, (SIZE, SIZE), 8)[body] * 10
        fat = body & ((xx / (body_a - 12)) ** 2 + (yy / (body_b - 12)) ** 2 > 1)
        hu[fat] = -90.0
        lungs = np.zeros_like(body)
        for s in (-1, 1):
            lungs |= ((xx - s * (gap / 2 + lung_a)) / lung_a) ** 2 + ((yy + 5) / lung_b) ** 2 <= 1
        hu[lungs] = lung_hu + texture[lungs]
        hu[lungs & (vessels > 0)] = rng.uniform(20, 70)
        hu[(xx / 22) ** 2 + ((yy - body_b * 0.6) / 22) ** 2 <= 1] = 450.0  # vertebra
        if label != "normal":
            r_here = np.sqrt(max(radius ** 2 - z ** 2, 0.0))
            if r_here > 0:
                d = np.hypot(yy - lesion_c[0], xx - lesion_c[1]) + shape_noise * radius * (0.25 if label == "malignant" else 0.05)
                if rim:
                    hu[lungs & (d < r_here + rim)] = rng.uniform(-550, -350)
                hu[lungs & (d < r_here)] = core
        hu += rng.normal(0, rng.uniform(8, 20), hu.shape)
        slices.append(hu)
    return slices


def to_grey(hu: np.ndarray, background: float) -> np.ndarray:
    """Bake a wide window (-1100..400 HU) into 8 bits; outside the body a flat grey, as some exports have."""
    grey = np.clip((hu + 1100) / 1500, 0, 1) * 255
    outside = ndimage.binary_opening(hu < -950, iterations=2)
    labels, _ = ndimage.label(outside)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    grey[np.isin(labels, border[border > 0])] = background
    return grey.astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed + 7919)
    labels = np.array(["benign", "malignant", "normal"] * (args.patients // 3 + 1))[:args.patients]
    rng.shuffle(labels)
    counts = {c: 0 for c in FOLDER}
    rows = []
    for i, label in enumerate(labels):
        for hu in draw_patient(rng, label, int(rng.integers(3, 7))):
            counts[label] += 1
            path = Path(f"{FOLDER[label]} cases") / f"{FOLDER[label]} case ({counts[label]}).jpg"
            (args.out / path.parent).mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_grey(hu, background=rng.uniform(90, 130))).save(args.out / path, quality=92)
            rows.append({"path": path.as_posix(), "label": label, "patient_id": f"B{i:04d}"})
    with open(args.out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} slices of {args.patients} patients to {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
