"""Synthetic chest CT phantoms in Hounsfield units, deterministic by seed.

A phantom is a slab of axial slices through the thorax in the canonical orientation of
:mod:`lung_effnet.io.volume` (``hu[z, y, x]``: x towards the patient's left, y posterior,
z superior). Everything is built in millimetres, so the anatomy is the same at any matrix size:

- air (-1000) outside the body, a patient table, a body with a subcutaneous fat layer (~ -100)
  over chest-wall muscle (~ +45);
- two lungs (about -850, denser posteriorly, with smooth parenchymal texture) that narrow towards
  the apex and sit on the diaphragm domes;
- pulmonary vessels grown as branching, tapering 3D trees from each hilum (dots and short segments
  that persist over slices, +30..+60 HU);
- mediastinum: heart (myocardium and blood pool), ascending / descending aorta and arch, pulmonary
  trunk, SVC, trachea and main bronchi, oesophagus, all in mediastinal fat;
- bone: vertebral bodies with discs, spinal canal and posterior elements, ribs (tilted ring segments
  with cortex and marrow, costal cartilage anteriorly), sternum;
- noise: Gaussian 10-25 HU, spatially correlated in-plane (the same filter blurs the image a little,
  like a reconstruction kernel); pixels outside the reconstruction circle are -1024.

Lesions (the only thing that depends on the label; see :func:`make_phantom`):

- ``benign``: 1-2 small (5-12 mm) smooth round nodules, about a third calcified (+200..+600 HU);
- ``malignant``: one 15-30 mm lobulated and/or spiculated solid nodule (spicules are thin radial
  strands) with a ground-glass rim (-500..-300 HU);
- ``normal``: none.

Sizes follow the clinical literature rather than what a small matrix can show: the probability
that a screening-detected nodule is cancer rises steeply with its diameter, and smooth, small,
calcified nodules are mostly benign while spiculation and size point to cancer (McWilliams et al.,
"Probability of cancer in pulmonary nodules detected on first screening CT", N Engl J Med
369:910-919, 2013, the Brock model); 30 mm is where a "nodule" becomes a "mass" and nodules under
6 mm carry under 1% risk (MacMahon et al., Fleischner Society guidelines, Radiology 284:228-243,
2017). The ranges here (benign 5-12 mm, malignant 15-30 mm) are this generator's choice within
those facts: size is a strong cue but not a separable one in real data, and a model trained here
learns an easier task than real nodule classification. Draw phantoms at a clinical matrix (512 px
over 350 mm, 0.68 mm a pixel) and let the preprocessing shrink them, as it does real CT.

Every patient-level quantity (body size, noise, vessel trees, slice position, ...) is drawn from
generators split off ``rng`` *before* and independently of the label, so a class cannot be told
from anything but the lesion: the same ``rng`` state gives the same patient with or without a lesion.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lung_effnet.classes import CLASSES
from lung_effnet.errors import InputError

AIR_HU = -1000.0
PADDING_HU = -1024.0  # outside the reconstruction circle, and the lower clip of every voxel
MAX_HU = 3071.0  # upper clip: keeps HU + 1024 within 12 bits for unsigned DICOM storage
LESION_MASK_LEVEL = 0.5  # a voxel belongs to a lesion when at least half of it is lesion
_Z_SUBSAMPLES = 5  # lesions are integrated over the slice thickness (partial volume)
_NOISE_FILTER_PX = 0.7  # in-plane Gaussian sigma of the noise correlation / blur, pixels


@dataclass(frozen=True)
class Lesion:
    """One lesion of a phantom.

    Attributes:
        kind: ``solid`` or ``calcified`` (benign), ``lobulated`` or ``spiculated`` (malignant).
        centre_vox: ``(z, y, x)`` centre in voxel coordinates (fractional).
        diameter_mm: diameter of the solid part (mean over directions).
        core_hu: HU of the solid part.
        rim_hu: HU of the ground-glass rim, ``None`` without a rim.
        n_slices: slices on which the lesion's mask is non-empty.
    """

    kind: str
    centre_vox: tuple[float, float, float]
    diameter_mm: float
    core_hu: float
    rim_hu: float | None
    n_slices: int


@dataclass
class Phantom:
    """A synthetic chest CT slab.

    Attributes:
        hu: ``(Z, Y, X)`` float32, HU, canonical orientation.
        mask: ``(Z, Y, X)`` uint8, 1 inside lesions (empty for ``normal``).
        spacing: ``(dz, dy, dx)`` in mm.
        label: ``benign``, ``malignant`` or ``normal``.
        lungs: ``(Z, Y, X)`` uint8, 1 inside the lungs (before lesions; lesions lie inside it).
        origin_lps: LPS position (mm) of voxel ``(0, 0, 0)``: the first slice's ImagePositionPatient.
        lesions: the lesions drawn into ``hu`` / ``mask``.
        params: patient-level parameters (noise SD, body size, vessel segment count, ...), all
            drawn independently of the label.
    """

    hu: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    label: str
    lungs: np.ndarray | None = None
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    lesions: list[Lesion] = field(default_factory=list)
    params: dict = field(default_factory=dict)


def make_phantom(
    label: str,
    rng: np.random.Generator,
    size_px: int = 128,
    n_slices: int = 24,
    fov_mm: float = 350.0,
    slice_mm: float = 2.5,
) -> Phantom:
    """Make one synthetic chest CT slab.

    Args:
        label: ``benign``, ``malignant`` or ``normal`` (case-insensitive).
        rng: the patient's generator; the same state gives the same patient (and, for the same
            label, the same lesion). Anatomy, noise and lesion use separate generators split off it
            first, so the anatomy does not depend on the label.
        size_px: matrix size (square), pixels.
        n_slices: number of axial slices (at least 3 for the lesion classes).
        fov_mm: reconstruction field of view (the image width), mm.
        slice_mm: slice thickness = spacing between slice centres, mm.

    Returns:
        A :class:`Phantom` with ``hu`` of shape ``(n_slices, size_px, size_px)``. Every lesion
        patient has its (first) lesion on at least 3 slices of ``mask`` when the slices are thin
        enough for that (true up to 3 mm slices; otherwise a warning says so).
    """
    label = _check_label(label)
    if size_px < 16 or n_slices < 1:
        raise InputError(f"size_px must be >= 16 and n_slices >= 1, got {size_px} and {n_slices}")
    if label != "normal" and n_slices < 3:
        raise InputError(f"a {label} phantom needs n_slices >= 3 to show its lesion, got {n_slices}")
    if fov_mm <= 0 or slice_mm <= 0:
        raise InputError(f"fov_mm and slice_mm must be positive, got {fov_mm} and {slice_mm}")

    seeds = rng.integers(0, 2**63 - 1, size=3)
    anatomy_rng, noise_rng, lesion_rng = (np.random.default_rng(int(s)) for s in seeds)
    pix = fov_mm / size_px
    spacing = (float(slice_mm), float(pix), float(pix))
    an = _draw_anatomy(anatomy_rng, fov_mm, n_slices, slice_mm)
    grid = _Grid(size_px, n_slices, spacing, an.z0)

    hu, lungs = _build_anatomy(an, grid, anatomy_rng)
    segments = _grow_vessel_trees(an, anatomy_rng)
    vessels = np.zeros(grid.shape, np.float32)
    _render_tubes(vessels, grid.to_volume_mm(segments), spacing)
    vessels *= lungs
    hu += vessels * (an.vessel_hu - hu)

    mask = np.zeros(grid.shape, np.uint8)
    lesions = _add_lesions(label, hu, mask, lungs, spacing, lesion_rng) if label != "normal" else []

    _add_noise(hu, an.noise_sd, noise_rng)
    np.clip(hu, PADDING_HU, MAX_HU, out=hu)
    hu[:, ~grid.in_fov] = PADDING_HU
    params = {
        "noise_sd": an.noise_sd, "body_width_mm": 2 * an.body_a, "body_depth_mm": 2 * an.body_b,
        "lung_height_mm": an.lung_height, "slab_centre_frac": an.slab_centre / an.lung_height,
        "n_vessel_segments": int(len(segments)), "vessel_hu": an.vessel_hu, "lung_hu": an.lung_hu,
    }
    return Phantom(hu=hu, mask=mask, spacing=spacing, label=label, lungs=lungs.astype(np.uint8),
                   origin_lps=grid.origin_lps(an.table_z), lesions=lesions, params=params)


def _check_label(label: str) -> str:
    norm = str(label).strip().lower()
    if norm not in CLASSES:
        raise InputError(f"label must be one of {CLASSES}, got {label!r}")
    return norm


# --------------------------------------------------------------------------------------------
# Patient-level parameters (independent of the label)


@dataclass(frozen=True)
class _Anatomy:
    """Every patient-level size, position and HU, in mm with x left, y posterior from the image
    centre and z superior from the lung base."""

    fov: float
    z0: float  # z of the first slice
    slab_centre: float
    table_z: float  # LPS z of the lung base
    cx: float
    cy: float
    body_a: float
    body_b: float
    fat: float
    muscle: float
    cav_cy: float
    cav_a: float
    cav_b: float
    lung_height: float
    dome: tuple[float, float]  # diaphragm dome height (fraction of lung height), right / left
    med_w: float
    heart: tuple[float, float, float, float, float, float]  # x, y, a, b, h_peak, h_half
    aorta_r: float
    arch_h: float
    carina_h: float
    trachea_r: float
    vb_y: float
    vb_r: float
    canal_r: float
    spinous_len: float
    vert_period: float
    vert_phase: float
    disc: float
    rib_h: float
    rib_t: float
    rib_drop: float
    rib_phase: float
    table_y: float
    soft_hu: float
    fat_hu: float
    blood_hu: float
    lung_hu: float
    lung_gradient: float
    texture_sd: float
    cortex_hu: float
    marrow_hu: float
    vessel_hu: float
    noise_sd: float


def _draw_anatomy(rng: np.random.Generator, fov: float, n_slices: int, slice_mm: float) -> _Anatomy:
    u = rng.uniform
    cx, cy = u(-6, 6), u(-8, 12)
    body_a = min(u(130, 165), 0.49 * fov)
    body_b = body_a * u(0.66, 0.8)
    fat, muscle = u(6, 26), u(8, 14)
    vb_r, canal_r, spinous_len = u(15, 20), u(6, 8), u(16, 24)
    vb_y = cy + body_b - 0.4 * fat - (vb_r + 2 * canal_r + spinous_len + 8)
    cav_front = cy - body_b + fat + muscle
    cav_back = vb_y + 1.3 * vb_r  # the lungs' posterior recesses flank the vertebral body
    cav_a = body_a - fat - muscle
    lung_height = u(190, 250)
    slab_centre = u(0.3, 0.7) * lung_height
    dome_r = u(0.08, 0.14)
    cav_cy, cav_b = (cav_front + cav_back) / 2, (cav_back - cav_front) / 2
    heart = (cx + u(0.12, 0.22) * cav_a, cav_cy - u(0.1, 0.2) * cav_b,
             u(0.36, 0.44) * cav_a, u(0.58, 0.68) * cav_b, u(0.1, 0.2), u(0.34, 0.4))
    return _Anatomy(
        fov=fov, z0=slab_centre - (n_slices - 1) / 2 * slice_mm, slab_centre=slab_centre,
        table_z=u(-350, -120), cx=cx, cy=cy, body_a=body_a, body_b=body_b, fat=fat, muscle=muscle,
        cav_cy=cav_cy, cav_a=cav_a, cav_b=cav_b, lung_height=lung_height,
        dome=(dome_r, dome_r - u(0.01, 0.04)), med_w=u(13, 20), heart=heart, aorta_r=u(11, 15),
        arch_h=u(0.72, 0.8), carina_h=u(0.6, 0.68), trachea_r=u(7.5, 10), vb_y=vb_y, vb_r=vb_r,
        canal_r=canal_r, spinous_len=spinous_len, vert_period=u(24, 30), vert_phase=u(0, 30),
        disc=u(4, 7), rib_h=u(8, 12), rib_t=u(5.5, 8), rib_drop=u(50, 90), rib_phase=u(0, 30),
        table_y=cy + body_b + u(8, 20), soft_hu=u(35, 50), fat_hu=u(-115, -85), blood_hu=u(40, 70),
        lung_hu=u(-880, -830), lung_gradient=u(20, 60), texture_sd=u(10, 30),
        cortex_hu=u(700, 1000), marrow_hu=u(180, 320), vessel_hu=u(30, 60), noise_sd=u(10, 25),
    )


@dataclass
class _Grid:
    """Voxel centres in anatomy mm: ``x[i]``, ``y[j]`` from the image centre, ``z[k]`` from the
    lung base."""

    size: int
    n_slices: int
    spacing: tuple[float, float, float]
    z0: float
    width: int | None = None  # columns, when not square

    def __post_init__(self):
        dz, dy, dx = self.spacing
        width = self.size if self.width is None else self.width
        self.shape = (self.n_slices, self.size, width)
        self.x = ((np.arange(width) - (width - 1) / 2) * dx)[None, :]
        self.y = ((np.arange(self.size) - (self.size - 1) / 2) * dy)[:, None]
        self.z = self.z0 + np.arange(self.n_slices) * dz
        self.in_fov = (self.x**2 + self.y**2) <= (width * dx / 2) ** 2

    def to_volume_mm(self, segments: np.ndarray) -> np.ndarray:
        """Anatomy-mm ``(z, y, x)`` points of segments to volume mm (voxel (0,0,0) at 0)."""
        offset = np.array([self.z0, self.y[0, 0], self.x[0, 0]])
        out = segments.copy()
        out[:, 0:3] -= offset
        out[:, 3:6] -= offset
        return out

    def origin_lps(self, table_z: float) -> tuple[float, float, float]:
        return (float(self.x[0, 0]), float(self.y[0, 0]), float(table_z + self.z0))


# --------------------------------------------------------------------------------------------
# Anatomy, slice by slice. Everything that does not change along z is computed once per plane
# (``_plane_geometry``); a slice then needs only comparisons against its height. The same
# functions answer "is this point in a lung?" for the vessel trees (points instead of a grid).


def _rho(x, y, cx, cy, a, b, p=2.0):
    """Normalised (super-)ellipse radius: < 1 inside."""
    if np.isscalar(p) and p == 2.0:
        return np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return (np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p) ** (1 / p)


def _d2(x, y, cx, cy):
    return (x - cx) ** 2 + (y - cy) ** 2


def _profile(h, centre, half):
    """Smooth bump in height: 1 at ``centre``, 0 beyond ``half`` from it."""
    return np.sqrt(np.clip(1 - ((h - centre) / half) ** 2, 0, 1))


def _centres(an: _Anatomy) -> dict[str, tuple[float, float]]:
    """In-plane centres of the mediastinal tubes (they run up and down the slab)."""
    cx, r_ao = an.cx, an.aorta_r
    oes_y = an.vb_y - an.vb_r - 8
    return {
        "des": (cx + 0.6 * an.vb_r + 0.6 * r_ao, an.vb_y - 0.7 * an.vb_r - 0.6 * r_ao),
        "asc": (cx - 10, an.cav_cy - 0.3 * an.cav_b),
        "pa": (cx + 18, an.cav_cy - 0.3 * an.cav_b),
        "svc": (cx - 32, an.cav_cy - 0.2 * an.cav_b),
        "oes": (cx + 3, oes_y),
        "tr": (cx, oes_y - 8 - an.trachea_r),
        "spine": (cx, an.vb_y),
    }


def _plane_geometry(an: _Anatomy, x, y) -> dict[str, np.ndarray]:
    """Height-independent quantities at in-plane points ``(x, y)`` (mm, broadcastable)."""
    x, y = np.broadcast_arrays(x, y)
    c = _centres(an)
    hx, hy, ha, hb = an.heart[:4]
    g = {name: _d2(x, y, *xy) for name, xy in c.items()}
    asc, des = np.array(c["asc"]), np.array(c["des"])
    v = des - asc
    t = np.clip(((x - asc[0]) * v[0] + (y - asc[1]) * v[1]) / (v @ v), 0, 1)
    g["arch"] = (x - asc[0] - t * v[0]) ** 2 + (y - asc[1] - t * v[1]) ** 2
    g["heart"] = _rho(x, y, hx, hy, ha, hb)
    g["chambers"] = _rho(x, y, hx - 0.1 * ha, hy + 0.05 * hb, 0.7 * ha, 0.68 * hb)
    g["ax"] = x - an.cx
    g["cavity"] = _cavity_rho(an, x, y) < 1
    front = an.cav_cy - an.cav_b
    med_w = an.med_w * (0.45 + 0.55 * np.clip((y - front) / an.cav_b, 0, 1))  # narrow in front
    lungs_possible = _cavity_rho(an, x, y, -1.5) < 1
    for side, name in ((-1, "right"), (1, "left")):
        lx, ly = an.cx + side * 0.5 * an.cav_a, an.cav_cy + 0.12 * an.cav_b
        p = np.where(y > ly, 2.5, 2.1)  # full posterior recesses
        g[name] = _rho(x, y, lx, ly, 0.58 * an.cav_a, an.cav_b, p)  # scales with the apex taper
        g[name + "_dome"] = 1 - np.minimum(g[name], 1) ** 2
        g[name + "_ok"] = lungs_possible & (side * g["ax"] > med_w)
    g["med_band"] = g["cavity"] & (np.abs(g["ax"]) < med_w + 4) & (y < an.vb_y)
    g["lung_depth"] = np.clip((y - front) / (2 * an.cav_b), 0, 1)  # 0 front, 1 back
    return g


def _cavity_rho(an: _Anatomy, x, y, grow: float = 0.0):
    """Normalised radius of the thoracic cavity (inside the ribs), boxy posteriorly."""
    p = np.where(y > an.cav_cy, 2.6, 2.0)
    return _rho(x, y, an.cx, an.cav_cy, an.cav_a + grow, an.cav_b + grow, p)


def _mediastinum(an: _Anatomy, g: dict, h) -> dict[str, np.ndarray]:
    """Boolean masks of the mediastinal structures at height fraction ``h`` (scalar or array
    broadcastable with the plane geometry ``g``)."""
    hp = _profile(h, an.heart[4], an.heart[5]) * (h > 0)
    r_ao, r_tr = an.aorta_r, an.trachea_r
    in_arch = (h >= an.arch_h) & (h < an.arch_h + 0.06)
    spread = np.clip((an.carina_h - h) / 0.1, 0, 1) * 30  # main bronchi part below the carina
    bronchi = (h < an.carina_h) & (h > an.carina_h - 0.1)
    trachea = h >= an.carina_h
    bro_d2 = (np.abs(g["ax"]) - spread) ** 2 + (g["tr"] - g["ax"] ** 2)  # to the nearer bronchus
    min_axis = min(an.heart[2], an.heart[3])
    return {
        "heart_fat": (g["heart"] < hp + 3 / min_axis) & (hp > 0),
        "heart": g["heart"] < hp,
        "chambers": g["chambers"] < hp,
        "aorta": ((g["des"] < (r_ao * ((h < an.arch_h + 0.03) & (h > -0.1))) ** 2)
                  | (g["asc"] < (1.15 * r_ao * ((h >= 0.45) & (h < an.arch_h))) ** 2)
                  | ((g["arch"] < r_ao**2) & in_arch)),
        "pulmonary": g["pa"] < (13.0 * ((h > 0.5) & (h < 0.62))) ** 2,
        "svc": g["svc"] < (8.0 * ((h > 0.5) & (h < 0.9))) ** 2,
        "oesophagus": g["oes"] < (7.0 * (h > -0.05)) ** 2,
        "airway_wall": ((g["tr"] < ((r_tr + 2) * trachea) ** 2)
                        | (bro_d2 < ((0.7 * r_tr + 2) * bronchi) ** 2)),
        "airway": (g["tr"] < (r_tr * trachea) ** 2) | (bro_d2 < (0.7 * r_tr * bronchi) ** 2),
        "spine": g["spine"] < (an.vb_r + 4) ** 2,
    }


def _lung_masks(an: _Anatomy, g: dict, h, med: dict | None = None) -> np.ndarray:
    """Inside either lung at height fraction ``h``: the lungs fill the thoracic cavity except the
    mediastinum, narrow towards the apex and sit on the diaphragm domes."""
    med = _mediastinum(an, g, h) if med is None else med
    taper = np.where(h > 0.35, _profile(h, 0.35, 0.65), 1.0)
    lungs = np.zeros(np.broadcast(g["ax"], h).shape, bool)
    for name, dome in (("right", an.dome[0]), ("left", an.dome[1])):
        lungs |= g[name + "_ok"] & (g[name] < taper) & (h > dome * g[name + "_dome"])
    blocked = med["heart_fat"] | med["aorta"] | med["pulmonary"] | med["svc"] | med["spine"]
    return lungs & ~blocked


def _inside_lungs(an: _Anatomy, pts: np.ndarray) -> np.ndarray:
    """Points ``(n, 3)`` as ``(z, y, x)`` anatomy mm inside a lung."""
    if len(pts) == 0:
        return np.zeros(0, bool)
    g = _plane_geometry(an, pts[:, 2], pts[:, 1])
    return _lung_masks(an, g, pts[:, 0] / an.lung_height)


def _build_anatomy(an: _Anatomy, grid: _Grid, rng: np.random.Generator):
    """``(hu, lungs)`` of the noise-free anatomy with parenchymal texture, without vessels or
    lesions; ``(Z, Y, X)`` float32 HU and bool."""
    hu = np.empty(grid.shape, np.float32)
    lungs = np.zeros(grid.shape, bool)
    x, y = grid.x.astype(np.float32), grid.y.astype(np.float32)
    g = _plane_geometry(an, x, y)
    static = _static_layers(an, g, x, y)
    bones = _bone_geometry(an, g, x, y)
    texture = _SmoothField(grid, 4.0, rng)
    for k, z in enumerate(grid.z):
        hu[k], lungs[k] = _slice(an, g, static, bones, float(z))
        hu[k] += lungs[k] * (an.texture_sd * texture.plane(k))
    return hu, lungs


def _static_layers(an: _Anatomy, g: dict, x, y) -> np.ndarray:
    """Table, body wall and cavity fill: the same on every slice."""
    img = np.full(g["ax"].shape, AIR_HU, np.float32)
    table_curve = an.table_y - x**2 / 800.0
    board = (y > table_curve) & (y < table_curve + 14) & (np.abs(x) < 0.45 * an.fov)
    img[board] = -800
    img[board & ((y < table_curve + 2) | (y > table_curve + 12))] = 150
    p = np.where(y > an.cy, 2.6, 2.0)  # the back flattens on the table
    img[_rho(x, y, an.cx, an.cy, an.body_a, an.body_b, p) < 1] = an.soft_hu  # skin
    inner_b = an.body_b - np.where(y > an.cy, 0.4 * an.fat, an.fat)
    img[_rho(x, y, an.cx, an.cy, an.body_a - 2, an.body_b - 2, p) < 1] = an.fat_hu
    img[_rho(x, y, an.cx, an.cy, an.body_a - an.fat, inner_b, p) < 1] = an.soft_hu + 5
    liver_side = np.broadcast_to(np.where(g["ax"] < 0, 12.0, 0.0), img.shape)  # patient's right
    img[g["cavity"]] = an.soft_hu + liver_side[g["cavity"]]
    return img


def _bone_geometry(an: _Anatomy, g: dict, x, y) -> dict[str, np.ndarray]:
    """Height-independent parts of the spine, ribs and sternum."""
    ax = g["ax"]
    r_vb = np.sqrt(g["spine"])
    canal_y = an.vb_y + an.vb_r + an.canal_r + 1
    rc = np.sqrt(ax**2 + (y - canal_y) ** 2)
    arch = (rc < an.canal_r + 4) & (rc >= an.canal_r) & (y > an.vb_y + an.vb_r - 2)
    spinous = (np.abs(ax) < 3.5) & (y > canal_y) & (y < canal_y + an.canal_r + an.spinous_len)
    transverse = (np.abs(y - canal_y + 2) < 4) & (np.abs(ax) < an.canal_r + 26) & (np.abs(ax) > an.canal_r)
    # ribs: tilted elliptical rings around the cavity, lower anteriorly, cut by each slice into
    # short arcs; costal cartilage continues them towards the sternum
    rho = np.maximum(_cavity_rho(an, x, y, 4.0), 1e-6)
    dy = y - an.cav_cy
    radial = np.sqrt(ax**2 + dy**2) * (1 - 1 / rho)  # mm outside (+) / inside (-) the ring
    phi = np.arctan2(np.abs(ax) / (an.cav_a + 4), dy / (an.cav_b + 4))  # 0 posterior, pi anterior
    front = an.cav_cy - an.cav_b
    return {
        "vb": r_vb < an.vb_r, "vb_depth": an.vb_r - r_vb, "canal": rc < an.canal_r,
        "posterior": arch | spinous | transverse,
        "rib_band": (np.abs(radial) < an.rib_t / 2) & (phi > 0.22),
        "rib_depth": an.rib_t / 2 - np.abs(radial),
        "rib_shift": an.rib_drop * (1 - np.cos(phi)) / 2,
        "rib_bone": phi <= 2.35, "cartilage": (phi > 2.35) & (phi < 2.85),
        "sternum": (np.abs(ax) < 15) & (y > front - 13) & (y < front - 1),
        "sternum_depth": np.minimum(15 - np.abs(ax), np.minimum(y - front + 13, front - 1 - y)),
    }


def _slice(an: _Anatomy, g: dict, static: np.ndarray, bones: dict, z: float):
    """One axial slice at height ``z`` (mm above the lung base): ``(hu, lungs)``."""
    img = static.copy()
    h = z / an.lung_height
    if -0.05 < h < 1.1:
        img[g["med_band"]] = an.fat_hu + 10
    med = _mediastinum(an, g, h)
    img[med["heart_fat"]] = an.fat_hu + 10
    img[med["heart"]] = an.soft_hu
    img[med["chambers"] | med["aorta"] | med["pulmonary"] | med["svc"]] = an.blood_hu
    img[med["oesophagus"]] = an.soft_hu - 5
    img[med["airway_wall"]] = an.soft_hu
    img[med["airway"]] = AIR_HU
    lungs = _lung_masks(an, g, h, med)
    img[lungs] = an.lung_hu + an.lung_gradient * g["lung_depth"][lungs]
    _paint_bones(img, an, bones, z, h)
    return img, lungs


def _bone(img, inside, depth_mm, an: _Anatomy):
    """Paint bone: cortex within 1.5 mm of the surface, marrow inside."""
    img[inside] = np.where(depth_mm[inside] < 1.5, an.cortex_hu, an.marrow_hu)


def _paint_bones(img, an: _Anatomy, b: dict, z: float, h: float):
    phase = (z - an.vert_phase) % an.vert_period
    if phase < an.disc:
        img[b["vb"]] = an.soft_hu + 40  # intervertebral disc
    else:
        end_plate = min(phase - an.disc, an.vert_period - phase)
        _bone(img, b["vb"], np.minimum(b["vb_depth"], end_plate), an)
    if phase > an.disc + 3:  # posterior elements on part of each vertebra's height
        img[b["posterior"]] = an.cortex_hu
    img[b["canal"]] = 15.0  # CSF and cord
    t = (z + b["rib_shift"] - an.rib_phase) % an.vert_period
    rib = b["rib_band"] & (t < an.rib_h)
    _bone(img, rib & b["rib_bone"], np.minimum(b["rib_depth"], np.minimum(t, an.rib_h - t)), an)
    img[rib & b["cartilage"]] = an.soft_hu + 80
    if 0.3 < h < 1.0:
        _bone(img, b["sternum"], b["sternum_depth"], an)


# --------------------------------------------------------------------------------------------
# Texture, vessels, noise


class _SmoothField:
    """Zero-mean, unit-SD random field, smooth over ``scale_mm``, read one slice at a time:
    Gaussian-filtered noise on a coarse grid, interpolated linearly (gathers only, no BLAS, so a
    512 x 512 x 200 field costs well under a second)."""

    def __init__(self, grid: _Grid, scale_mm: float, rng: np.random.Generator):
        coarse = [int(math.ceil(n * s / scale_mm)) + 2 for n, s in zip(grid.shape, grid.spacing)]
        f = ndimage.gaussian_filter(rng.standard_normal(coarse), 0.8, mode="wrap")
        self.field = ((f - f.mean()) / (f.std() + 1e-9)).astype(np.float32)
        self.z, self.y, self.x = (_linear_index(n, s, scale_mm, c)
                                  for n, s, c in zip(grid.shape, grid.spacing, coarse))

    def plane(self, k: int) -> np.ndarray:
        (i0, fz), (j0, fy), (l0, fx) = self.z, self.y, self.x
        c = self.field[i0[k]] * (1 - fz[k]) + self.field[i0[k] + 1] * fz[k]
        rows = c[j0] * (1 - fy)[:, None] + c[j0 + 1] * fy[:, None]
        return rows[:, l0] * (1 - fx) + rows[:, l0 + 1] * fx


def _linear_index(n: int, step_mm: float, scale_mm: float, n_coarse: int):
    """Lower coarse node and weight of the upper one for ``n`` voxels ``step_mm`` apart (coarse
    nodes every ``scale_mm``, starting one node before the first voxel)."""
    pos = np.arange(n) * step_mm / scale_mm + 1.0
    i0 = np.clip(np.floor(pos).astype(int), 0, n_coarse - 2)
    return i0, (pos - i0).astype(np.float32)


def _smooth_field(shape, spacing, scale_mm, rng) -> np.ndarray:
    """A whole :class:`_SmoothField` volume (for small boxes)."""
    grid = _Grid(shape[1], shape[0], spacing, 0.0, width=shape[2])
    field_ = _SmoothField(grid, scale_mm, rng)
    return np.stack([field_.plane(k) for k in range(shape[0])])


def _grow_vessel_trees(an: _Anatomy, rng: np.random.Generator, generations: int = 12,
                       max_tips: int = 1500) -> np.ndarray:
    """Pulmonary vessel trees in anatomy mm, grown generation by generation from each hilum.

    Returns ``(n, 8)`` segments: start ``(z, y, x)``, end ``(z, y, x)``, start and end radius.
    A branch that would leave the lung tries one other direction, then stops.
    """
    tips_p, tips_d, tips_r = [], [], []
    # arteries enter with the bronchi; veins leave lower and further forward, to the left atrium
    for side, (h_lo, h_hi, y_lo, y_hi) in [(s, h) for s in (-1, 1)
                                            for h in ((0.4, 0.5, -0.05, 0.15), (0.28, 0.36, -0.2, 0.0))]:
        z_h = rng.uniform(h_lo, h_hi) * an.lung_height
        y_h = an.cav_cy + rng.uniform(y_lo, y_hi) * an.cav_b
        xs = an.cx + side * np.arange(an.med_w * 0.5, an.cav_a, 2.0)
        inside = _inside_lungs(an, np.column_stack([np.full_like(xs, z_h), np.full_like(xs, y_h), xs]))
        n_roots = int(rng.integers(5, 9))
        elevs = np.linspace(-1.3, 1.0, n_roots) + rng.uniform(-0.2, 0.2, n_roots)
        azims = rng.uniform(-0.8, 0.8, n_roots)
        radii = rng.uniform(3.0, 5.5, n_roots)
        if not inside.any():
            continue
        hilum = np.array([z_h, y_h, xs[np.argmax(inside)] - side * 4.0])  # at the lung's root
        for elev, azim, r in zip(elevs, azims, radii):
            d = np.array([np.sin(elev), np.cos(elev) * np.sin(azim), side * np.cos(elev) * np.cos(azim)])
            tips_p.append(hilum)
            tips_d.append(d)
            tips_r.append(r)
    p, d, r = np.array(tips_p).reshape(-1, 3), np.array(tips_d).reshape(-1, 3), np.array(tips_r)
    segments = []
    for _ in range(generations):
        if len(p) == 0:
            break
        length = np.clip(r * rng.uniform(5, 10, len(r)), 3, 40)
        q, ok = _extend(an, p, d, length)
        retry = _unit_vectors(rng, len(p))
        d = np.where(ok[:, None], d, d + 0.9 * retry)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        q2, ok2 = _extend(an, p, d, length)
        q = np.where(ok[:, None], q, q2)
        ok |= ok2
        r_end = 0.92 * r
        segments.append(np.column_stack([p, q, r, r_end])[ok])
        keep = ok & (r_end * 0.7 > 0.3)
        if keep.sum() > max_tips:  # bound the work; which tips stop is random
            keep[rng.permutation(np.flatnonzero(keep))[max_tips:]] = False
        p, d, r = _branch(q[keep], d[keep], r_end[keep], rng)
    return np.concatenate(segments) if segments else np.zeros((0, 8))


def _extend(an: _Anatomy, p, d, length):
    """End points of segments from ``p`` along ``d``: full length if it ends in a lung, else half
    length; ``ok`` says whether either does."""
    q = p + d * length[:, None]
    ok = _inside_lungs(an, q)
    half = p + d * (length / 2)[:, None]
    ok_half = _inside_lungs(an, half)
    return np.where(ok[:, None], q, half), ok | ok_half


def _branch(p, d, r, rng):
    """Two children per tip: a major one (0.82-0.92 r) and a minor one (0.6-0.75 r), diverging."""
    n = len(p)
    v = rng.standard_normal((n, 3))
    perp = v - (v * d).sum(1, keepdims=True) * d
    perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
    a1, a2 = rng.uniform(0.25, 0.6, n), rng.uniform(0.4, 0.8, n)
    d1 = np.cos(a1)[:, None] * d + np.sin(a1)[:, None] * perp
    d2 = np.cos(a2)[:, None] * d - np.sin(a2)[:, None] * perp
    r1, r2 = r * rng.uniform(0.82, 0.92, n), r * rng.uniform(0.6, 0.75, n)
    return np.concatenate([p, p]), np.concatenate([d1, d2]), np.concatenate([r1, r2])


def _render_tubes(out: np.ndarray, segments: np.ndarray, spacing) -> None:
    """Max-composite the partial-volume coverage (0..1) of tapered tubes into ``out``.

    Args:
        out: ``(Z, Y, X)`` float32 coverage, updated in place.
        segments: ``(n, 8)`` start ``(z, y, x)``, end ``(z, y, x)`` in volume mm (voxel (0, 0, 0)
            at 0), start and end radius in mm.

    Segments are batched by the size of their bounding boxes (rounded up to powers of two), so the
    work is a handful of array operations rather than one Python iteration per segment.
    """
    if len(segments) == 0:
        return
    spacing = np.asarray(spacing, float)
    shape = np.array(out.shape)
    p, q, r0 = segments[:, 0:3], segments[:, 3:6], segments[:, 6:7]
    lo = np.maximum(np.floor((np.minimum(p, q) - r0 - spacing[1]) / spacing), 0).astype(int)
    hi = np.minimum(np.ceil((np.maximum(p, q) + r0 + spacing[1]) / spacing) + 1, shape).astype(int)
    visible = np.all(hi > lo, axis=1)
    segments, lo, hi = segments[visible], lo[visible], hi[visible]
    box = 2 ** np.ceil(np.log2(np.maximum(hi - lo, 1))).astype(int)
    keys, group = np.unique(box, axis=0, return_inverse=True)
    flat = out.reshape(-1)
    for g, size in enumerate(keys):
        members = np.flatnonzero(group.ravel() == g)
        for chunk in np.array_split(members, max(1, len(members) * int(np.prod(size)) // 2_000_000 + 1)):
            idx, cov = _tube_coverage(segments[chunk], lo[chunk], size, spacing, shape)
            np.maximum.at(flat, idx, cov)


def _tube_coverage(segments, lo, size, spacing, shape):
    """Flat voxel indices and coverage of a batch of tubes whose boxes fit in ``size`` voxels."""
    offsets = [np.arange(n) for n in size]
    vox = [lo[:, a, None, None, None] + offsets[a].reshape([-1 if i == a else 1 for i in range(3)])
           for a in range(3)]  # each (n, bz, by, bx) after broadcasting
    pos = [v * spacing[a] for a, v in enumerate(vox)]
    p = [segments[:, a, None, None, None] for a in range(3)]
    v = [segments[:, 3 + a, None, None, None] - p[a] for a in range(3)]
    vv = v[0] ** 2 + v[1] ** 2 + v[2] ** 2 + 1e-9
    t = np.clip(((pos[0] - p[0]) * v[0] + (pos[1] - p[1]) * v[1] + (pos[2] - p[2]) * v[2]) / vv, 0, 1)
    dist = np.sqrt(sum((pos[a] - p[a] - t * v[a]) ** 2 for a in range(3)))
    r0, r1 = segments[:, 6, None, None, None], segments[:, 7, None, None, None]
    radius = r0 + t * (r1 - r0)
    # thin tubes fill only part of a voxel: scale by the fraction of the pixel / slab they span
    rm = (r0 + r1) / 2
    along_z = np.abs(v[0]) / np.sqrt(vv)
    fill = np.minimum(1, 2 * rm / spacing[1]) * (along_z + (1 - along_z) * np.minimum(1, 2 * rm / spacing[0]))
    cov = np.clip((radius - dist) / spacing[1] + 0.5, 0, 1) * fill
    inside = (vox[0] < shape[0]) & (vox[1] < shape[1]) & (vox[2] < shape[2]) & (cov > 0)
    idx = (vox[0] * shape[1] + vox[1]) * shape[2] + vox[2]
    idx, cov = np.broadcast_arrays(idx, cov)
    return idx[inside], cov[inside].astype(np.float32)


def _add_noise(hu: np.ndarray, sd: float, rng: np.random.Generator) -> None:
    """Add Gaussian noise of SD ``sd`` HU, correlated in-plane, and blur the image by the same
    small kernel (as a reconstruction kernel does), in place."""
    s = _NOISE_FILTER_PX
    radius = int(4.0 * s + 0.5)
    k1 = np.exp(-0.5 * (np.arange(-radius, radius + 1) / s) ** 2)
    k1 /= k1.sum()
    gain = float((k1**2).sum())  # SD of filtered unit white noise (2D separable kernel)
    for k in range(hu.shape[0]):  # slice by slice: bounded memory on big volumes
        noisy = hu[k] + rng.standard_normal(hu.shape[1:], dtype=np.float32) * np.float32(sd / gain)
        hu[k] = ndimage.gaussian_filter(noisy, s, mode="nearest")


# --------------------------------------------------------------------------------------------
# Lesions


@dataclass
class _LesionDraw:
    kind: str
    radius: float  # mean radius of the solid part, mm
    min_radius: float  # never shrunk below this to fit a lung: the class's smallest size
    max_radius: float  # never grown beyond this to reach 3 slices: the class's largest size
    core_hu: float
    rim_hu: float | None = None
    rim_mm: float = 0.0
    bumps: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # (vz, vy, vx, amp, kappa)
    axes: np.ndarray = field(default_factory=lambda: np.ones(3))
    spicules: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # (vz, vy, vx, len, r0)
    rim_wave: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # rows (wz, wy, wx, phase)
    texture_seed: int | None = None  # internal heterogeneity of the solid part

    @property
    def extent(self) -> float:
        """Upper bound of the radius of the solid part plus rim (spicules excluded), mm."""
        lob = float(np.clip(self.bumps[:, 3], 0, None).sum()) if len(self.bumps) else 0.0
        return self.radius * (1 + lob) * float(self.axes.max()) + self.rim_mm * 1.5


def _unit_vectors(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _draw_benign(rng) -> _LesionDraw:
    calcified = rng.random() < 1 / 3
    axes = rng.uniform(0.9, 1.1, 3)
    return _LesionDraw(
        kind="calcified" if calcified else "solid", radius=rng.uniform(5, 12) / 2, min_radius=2.5, max_radius=6.0,
        core_hu=rng.uniform(200, 600) if calcified else rng.uniform(20, 60), axes=axes / axes.mean())


def _draw_malignant(rng) -> _LesionDraw:
    spiculated = rng.random() < 0.5
    n_bumps = int(rng.integers(4, 9))
    amp = rng.uniform(-0.25, 0.3 if spiculated else 0.5, n_bumps)
    bumps = np.column_stack([_unit_vectors(rng, n_bumps), amp, rng.uniform(4, 14, n_bumps)])
    radius = rng.uniform(15, 30) / 2
    n_spic = int(rng.integers(12, 29)) if spiculated else int(rng.integers(0, 6))
    dirs = _unit_vectors(rng, n_spic) * [0.35, 1.0, 1.0]  # strands mostly near the axial plane
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-12
    spicules = np.column_stack([dirs, radius * rng.uniform(0.5, 1.3, n_spic) + 2.0,
                                rng.uniform(0.8, 1.8, n_spic)])
    waves = np.column_stack([rng.uniform(-3, 3, (2, 3)) * [[1], [2]], rng.uniform(0, 2 * np.pi, 2)])
    return _LesionDraw(kind="spiculated" if spiculated else "lobulated", radius=radius, min_radius=7.5, max_radius=15.0,
                       core_hu=rng.uniform(20, 50), rim_hu=rng.uniform(-500, -300),
                       rim_mm=rng.uniform(1.5, 4.5), bumps=bumps, spicules=spicules, rim_wave=waves,
                       texture_seed=int(rng.integers(2**31)))


def _radius_fn(les: _LesionDraw, uz, uy, ux):
    """Radius of the solid part along unit directions (arrays), mm."""
    norm = np.sqrt((uz / les.axes[0]) ** 2 + (uy / les.axes[1]) ** 2 + (ux / les.axes[2]) ** 2)
    r = les.radius / np.maximum(norm, 1e-6)  # the centre itself (u = 0) is inside
    for vz, vy, vx, amp, kappa in les.bumps:
        mean = (1 - math.exp(-2 * kappa)) / (2 * kappa)  # sphere average of the bump
        r = r + les.radius * amp * (np.exp(kappa * (uz * vz + uy * vy + ux * vx - 1)) - mean)
    return np.maximum(r, 0.4 * les.radius)


def _add_lesions(label, hu, mask, lungs, spacing, rng) -> list[Lesion]:
    """Draw, place and paint the label's lesions into ``hu`` / ``mask`` (in place)."""
    draws = ([_draw_benign(rng)] + ([_draw_benign(rng)] if rng.random() < 0.5 else [])
             if label == "benign" else [_draw_malignant(rng)])
    depth, stride = _lung_depth(lungs, spacing)
    placed: list[tuple[np.ndarray, float]] = []
    lesions = []
    for i, les in enumerate(draws):
        centre = _place(les, depth, stride, spacing, placed, rng)
        if centre is None:
            if i == 0:
                raise RuntimeError("no lung in the slab deep enough for a lesion")
            continue
        fields = _lesion_fields(les, centre, hu.shape, spacing, lungs)
        if i == 0:
            centre, fields = _ensure_three_slices(les, centre, fields, hu.shape, spacing, lungs)
        bb, f_rim, f_solid = fields
        sub = hu[bb]
        if les.rim_hu is not None:
            sub += f_rim * (les.rim_hu - sub)
        core: float | np.ndarray = les.core_hu
        if les.texture_seed is not None:  # mildly heterogeneous solid tumour
            core = core + 12.0 * _smooth_field(sub.shape, spacing, 3.0, np.random.default_rng(les.texture_seed))
        sub += f_solid * (core - sub)
        lesion_mask = np.maximum(f_rim, f_solid) >= LESION_MASK_LEVEL
        mask[bb] |= lesion_mask.astype(np.uint8)
        placed.append((centre * np.asarray(spacing), les.extent))
        cz, cy, cx = (float(c) for c in centre)  # (z, y, x)
        lesions.append(Lesion(kind=les.kind, centre_vox=(cz, cy, cx),
                              diameter_mm=2 * les.radius, core_hu=float(les.core_hu),
                              rim_hu=None if les.rim_hu is None else float(les.rim_hu),
                              n_slices=int(lesion_mask.any(axis=(1, 2)).sum())))
    return lesions


def _lung_depth(lungs, spacing):
    """Distance (mm) from each lung voxel to the lung's edge, on an in-plane grid of ~2 mm."""
    stride = max(1, int(round(2.0 / spacing[1])))
    coarse = lungs[:, ::stride, ::stride]
    sampling = (spacing[0], spacing[1] * stride, spacing[2] * stride)
    # slab ends are not lung edges: pad with lung so only real boundaries count in z
    padded = np.pad(coarse, ((1, 1), (0, 0), (0, 0)), mode="edge")
    return ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1], stride


def _place(les, depth, stride, spacing, placed, rng) -> np.ndarray | None:
    """Centre ``(z, y, x)`` in voxels deep enough inside a lung for the whole lesion (shrinking the
    lesion when no place is deep enough), away from lesions already placed."""
    n = depth.shape[0]
    dz = spacing[0]
    reach = int(math.ceil(les.extent / dz))
    k_lo, k_hi = (reach, n - 1 - reach) if n - 1 - 2 * reach >= 0 else (1, n - 2)
    k_lo, k_hi = max(k_lo, 1), min(k_hi, n - 2)
    d = depth.copy()
    d[:k_lo] = 0
    d[k_hi + 1:] = 0
    kk = (np.arange(d.shape[0]) * dz)[:, None, None]
    jj = (np.arange(d.shape[1]) * spacing[1] * stride)[None, :, None]
    ii = (np.arange(d.shape[2]) * spacing[2] * stride)[None, None, :]
    for c_mm, ext in placed:
        far = np.sqrt((kk - c_mm[0]) ** 2 + (jj - c_mm[1]) ** 2 + (ii - c_mm[2]) ** 2) > ext + les.extent + 3
        d *= far
    need = les.extent + 2.0
    cand = np.flatnonzero(d.ravel() >= need)
    if len(cand) == 0:
        best = float(d.max())
        if best <= 2.5:
            return None
        scale = (best - 2.0) / les.extent  # shrink to fit (a lung too thin for the lesion)
        les.radius = max(les.min_radius, les.radius * scale)
        les.rim_mm *= max(0.3, scale)
        cand = np.flatnonzero(d.ravel() >= best - 1e-6)
    k, j, i = np.unravel_index(cand[rng.integers(len(cand))], d.shape)
    jitter = rng.uniform(-0.2, 0.2, 3)
    return np.array([k + jitter[0], j * stride + jitter[1], i * stride + jitter[2]], float)


def _lesion_fields(les, centre, shape, spacing, lungs):
    """Partial-volume coverage of the rim and the solid part (core + spicules) in the lesion's
    bounding box: ``(bbox slices, f_rim, f_solid)``, each ``(z, y, x)`` float32 in [0, 1]."""
    spacing = np.asarray(spacing, float)
    dz, pix = spacing[0], spacing[1]
    c_mm = centre * spacing
    spic_len = float(les.spicules[:, 3].max()) if len(les.spicules) else 0.0
    reach = les.extent + spic_len + 2 * pix
    lo = np.maximum(np.floor((c_mm - reach) / spacing), 0).astype(int)
    hi = np.minimum(np.ceil((c_mm + reach) / spacing) + 1, shape).astype(int)
    bb = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = (np.arange(_Z_SUBSAMPLES) + 0.5) / _Z_SUBSAMPLES - 0.5
    rz = (np.arange(lo[0], hi[0])[:, None] + sub[None, :]) * dz - c_mm[0]
    rz = rz[:, :, None, None]
    ry = (np.arange(lo[1], hi[1]) * pix - c_mm[1])[None, None, :, None]
    rx = (np.arange(lo[2], hi[2]) * spacing[2] - c_mm[2])[None, None, None, :]
    dist = np.sqrt(rz**2 + ry**2 + rx**2) + 1e-6
    r_solid = _radius_fn(les, rz / dist, ry / dist, rx / dist)
    f_solid = np.clip((r_solid - dist) / pix + 0.5, 0, 1).mean(axis=1)
    f_rim = np.zeros_like(f_solid)
    if les.rim_mm > 0:
        u = (rz / dist, ry / dist, rx / dist)
        wobble = 1.0  # uneven rim: thicker on some sides than others
        for wz, wy, wx, phase in les.rim_wave:
            wobble = wobble + 0.25 * np.sin(wz * u[0] + wy * u[1] + wx * u[2] + phase)
        edge = max(pix, 1.5)  # ground glass fades out rather than ending sharply
        f_rim = np.clip((r_solid + les.rim_mm * wobble - dist) / edge + 0.5, 0, 1).mean(axis=1)
    if len(les.spicules):
        f_sp = np.zeros(f_solid.shape, np.float32)
        v = les.spicules[:, :3]
        r_base = _radius_fn(les, v[:, 0], v[:, 1], v[:, 2])
        start = c_mm + v * (0.7 * r_base)[:, None] - lo * spacing
        end = c_mm + v * (r_base + les.spicules[:, 3])[:, None] - lo * spacing
        segs = np.column_stack([start, end, les.spicules[:, 4], np.full(len(v), 0.3)])
        _render_tubes(f_sp, segs, spacing)
        f_solid = np.maximum(f_solid, f_sp)
    in_lung = lungs[bb]
    return bb, (f_rim * in_lung).astype(np.float32), (f_solid * in_lung).astype(np.float32)


def _mask_slices(fields) -> int:
    _, f_rim, f_solid = fields
    return int((np.maximum(f_rim, f_solid) >= LESION_MASK_LEVEL).any(axis=(1, 2)).sum())


def _ensure_three_slices(les, centre, fields, shape, spacing, lungs):
    """Centre a first lesion that shows on fewer than 3 slices on a voxel, then grow it (within
    its class's size range) until it does; warn when the slices are too thick for that.
    Returns ``(centre, fields)``; ``les.radius`` is updated in place."""
    if _mask_slices(fields) >= 3:
        return centre, fields
    centre = np.round(centre)
    fields = _lesion_fields(les, centre, shape, spacing, lungs)
    while _mask_slices(fields) < 3 and les.radius < les.max_radius:
        les.radius = min(les.max_radius, les.radius + 0.25)
        fields = _lesion_fields(les, centre, shape, spacing, lungs)
    if _mask_slices(fields) < 3:
        warnings.warn(f"a {2 * les.radius:.0f} mm lesion covers fewer than 3 slices of {spacing[0]} mm",
                      stacklevel=4)
    return centre, fields
