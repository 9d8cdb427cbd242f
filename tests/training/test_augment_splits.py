"""Batched augmentation and patient-grouped folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lung_effnet.config import AugmentConfig
from lung_effnet.errors import LeakageError
from lung_effnet.training.augment import augment_batch
from lung_effnet.training.splits import assign_folds, audit_folds, inner_validation_split


def test_augmentation_is_reproducible_bounded_and_off_when_disabled():
    x = torch.rand(6, 1, 32, 32).half()
    cfg = AugmentConfig()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert a.dtype == x.dtype and a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and not torch.equal(a, x)
    off = AugmentConfig(flip_prob=0, rotate_deg=0, zoom=0, intensity_shift=0, intensity_scale=0, noise_std=0, prob=0)
    torch.testing.assert_close(augment_batch(x.float(), off, torch.Generator().manual_seed(1)), x.float(), atol=1e-6, rtol=0)


def test_flip_only_mirrors_left_right():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 1] = 1.0
    cfg = AugmentConfig(flip_prob=1.0, rotate_deg=0, zoom=0, intensity_shift=0, intensity_scale=0, noise_std=0, prob=0)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert float(out[0, 0, 2, 6]) == pytest.approx(1.0) and float(out.sum()) == pytest.approx(1.0)


def test_masks_move_with_the_images_and_change_no_random_draw():
    x = torch.zeros(4, 1, 32, 32)
    x[:, 0, 8:14, 20:26] = 1.0  # a bright square, and its mask
    masks = (x > 0.5).to(torch.uint8)
    cfg = AugmentConfig(rotate_deg=30, zoom=0.2, translate=0.1, intensity_shift=0, intensity_scale=0, noise_std=0, prob=1.0)
    alone = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    images, moved = augment_batch(x, cfg, torch.Generator().manual_seed(3), masks=masks)
    assert torch.equal(images, alone)  # the masks ride along: same draws, same images
    assert moved.shape == (4, 1, 32, 32) and not torch.equal(moved, masks.float())
    torch.testing.assert_close(moved, images, atol=1e-5, rtol=0)  # the mask is where the square went


def test_translate_shifts_by_the_configured_fraction():
    x = torch.zeros(64, 1, 32, 32)
    x[:, 0, 16, 16] = 1.0
    cfg = AugmentConfig(flip_prob=0, rotate_deg=0, zoom=0, translate=0.25, intensity_shift=0, intensity_scale=0,
                        noise_std=0, prob=1.0)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    cols = (out[:, 0].sum(1) * torch.arange(32)).sum(1) / out[:, 0].sum((1, 2)).clamp(min=1e-6)
    assert float((cols - 16).abs().max()) <= 0.25 * 32 + 1 and float((cols - 16).abs().max()) > 4


def test_mixup_blends_two_batches_with_a_beta_weight():
    from lung_effnet.training.augment import beta_sample, mixup

    x = torch.rand(8, 1, 4, 4)
    mixed, perm, lam = mixup(x, 0.4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    draws = np.array([beta_sample(0.4, torch.Generator().manual_seed(i)) for i in range(2000)])
    assert abs(draws.mean() - 0.5) < 0.03 and abs(draws.var() - 0.4 ** 2 / (0.8 ** 2 * 1.8)) < 0.02  # Beta(0.4, 0.4)


def _toy(n_patients=30, per_patient=4, seed=0):
    rng = np.random.default_rng(seed)
    patient_label = rng.integers(0, 3, n_patients)
    patient_ids = np.repeat([f"P{i}" for i in range(n_patients)], per_patient)
    return np.repeat(patient_label, per_patient), patient_ids


def test_folds_keep_patients_together_and_are_fixed_by_seed():
    labels, patient_ids = _toy()
    folds = assign_folds(labels, patient_ids, k=5, seed=3)
    for g in set(patient_ids):
        assert len(set(folds[patient_ids == g])) == 1
    assert set(folds) == set(range(5))
    assert (assign_folds(labels, patient_ids, k=5, seed=3) == folds).all()
    audit_folds(folds, patient_ids, np.arange(len(patient_ids)).astype(str))


def test_held_out_test_patients_and_inner_validation():
    labels, patient_ids = _toy(60)
    folds = assign_folds(labels, patient_ids, k=3, seed=0, test_fraction=0.2)
    test_patients = set(patient_ids[folds == -1])
    assert 0.1 < len(test_patients) / 60 < 0.3
    train_idx, val_idx = inner_validation_split(labels, patient_ids, 0.1, seed=0)
    assert not set(patient_ids[train_idx]) & set(patient_ids[val_idx]) and len(val_idx) > 0


def test_audit_stops_on_leakage():
    labels, patient_ids = _toy()
    folds = assign_folds(labels, patient_ids, k=3, seed=0)
    leaky = folds.copy()
    leaky[0] = (folds[0] + 1) % 3  # one slice of a patient moved to another fold
    with pytest.raises(LeakageError, match="patient"):
        audit_folds(leaky, patient_ids, np.arange(len(patient_ids)).astype(str))
    digests = np.arange(len(patient_ids)).astype(str)
    other = np.flatnonzero(folds != folds[0])[0]
    digests[other] = digests[0]  # the same image in two folds
    with pytest.raises(LeakageError, match="identical image"):
        audit_folds(folds, patient_ids, digests)


def test_too_few_patients_for_the_folds_is_a_clear_error():
    labels, patient_ids = _toy(4)
    with pytest.raises(ValueError, match="cv.folds=5"):
        assign_folds(labels, patient_ids, k=5, seed=0)


def test_a_fold_too_small_for_its_validation_split_trains_without_one(caplog):
    """``train.val_fraction=0.1`` splits 10 ways; a fold whose classes all have fewer rows used to end
    in scikit-learn's traceback ("n_splits=10 cannot be greater than ..."): now a warning and no validation."""
    from lung_effnet.training.splits import inner_validation_split

    labels = np.repeat([0, 1, 2], 8)
    patients = np.array([f"p{i // 2}" for i in range(24)])
    with caplog.at_level("WARNING"):
        train, val = inner_validation_split(labels, patients, 0.1, seed=0)
    assert len(train) == 24 and len(val) == 0
    assert "without validation patients" in caplog.text
    train, val = inner_validation_split(labels, patients, 0.25, seed=0)  # 4 ways: split as before
    assert len(val) > 0 and not set(patients[val]) & set(patients[train])
