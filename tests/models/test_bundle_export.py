"""``lung-effnet export-bundle``: a MONAI bundle that MONAI's own tools load, verify and run, and whose
predictions are those of ``load_model(...).predict_proba`` on the same files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.cli import main
from lung_effnet.models.predictor import load_model

# The fields MONAI's bundle metadata schema requires (meta_schema_20240725.json, the schema the MONAI model
# zoo's metadata points to; verify_metadata downloads it, so offline it is checked here): top level, then
# each tensor of network_data_format's inputs / outputs, with their JSON types.
SCHEMA_REQUIRED = {"schema": str, "version": str, "monai_version": str, "pytorch_version": str, "numpy_version": str,
                   "required_packages_version": dict, "task": str, "description": str, "authors": str, "copyright": str,
                   "network_data_format": dict}
SCHEMA_OPTIONAL = {"changelog": dict, "data_source": str, "data_type": str, "image_classes": str, "pred_classes": str,
                   "eval_metrics": dict, "intended_use": str, "references": list}
TENSOR_REQUIRED = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str, "value_range": list}


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's bundle, written by the command line."""
    out = tmp_path_factory.mktemp("bundle") / "tiny_bundle"
    assert main(["export-bundle", "-q", str(tiny_model_dir), "--out", str(out), "--authors", "Test Lab"]) == 0
    return out


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """A folder of 3 synthetic DICOM slices, 3 JPG slices and one file that is not DICOM."""
    from lung_effnet.synthetic.dataset import write_synthetic_dataset

    base = tmp_path_factory.mktemp("slices")
    dicom = write_synthetic_dataset(base / "dicom", "dicom", n_patients=2, seed=0, size_px=48, n_slices=3, progress=False)
    jpg = write_synthetic_dataset(base / "jpg", "jpg", n_patients=3, seed=0, size_px=48, n_slices=3, progress=False)
    folder = base / "input"
    (folder / "series").mkdir(parents=True)
    for path in sorted(dicom.glob("P*/*.dcm"))[:3]:
        shutil.copy(path, folder / "series" / path.name)
    for path in sorted(jpg.glob("*cases/*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.dcm").write_bytes(b"not a DICOM file")
    return folder


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in a fresh process, as a bundle user runs it."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_bundle_has_the_layout_monai_expects(bundle):
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE"):
        assert (bundle / name).is_file(), name
    assert (bundle / "LICENSE").read_text().lstrip().startswith("Apache License")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["_target_"] == "lung_effnet.models.bundle.EnsembleNetwork"
    assert "Research use only" in (bundle / "docs" / "README.md").read_text()


def test_metadata_has_every_field_the_monai_schema_requires(bundle, tiny_model_dir):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key, kind in {**SCHEMA_REQUIRED, **SCHEMA_OPTIONAL}.items():
        assert isinstance(meta.get(key), kind), f"{key}: {meta.get(key)!r}"
    assert set(meta["network_data_format"]) >= {"inputs", "outputs"}
    assert all(isinstance(v, str) for v in meta["references"])
    for section in ("inputs", "outputs"):
        for name, tensor in meta["network_data_format"][section].items():
            for key, kind in TENSOR_REQUIRED.items():
                assert isinstance(tensor.get(key), kind) and not isinstance(tensor.get(key), bool), f"{section}.{name}.{key}"
            assert all(isinstance(v, (int, float)) for v in tensor["value_range"])
            assert all(isinstance(v, (int, str)) for v in tensor["spatial_shape"])

    image = meta["network_data_format"]["inputs"]["image"]  # the tiny model: 1 channel, 32 px
    assert (image["num_channels"], image["spatial_shape"], image["value_range"], image["dtype"]) == (1, [32, 32], [0, 1], "float32")
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["type"] == "probabilities"
    assert [pred["channel_def"][str(i)] for i in range(3)] == list(CLASSES)
    assert "Research use only" in meta["intended_use"] and "not for diagnosis" in meta["intended_use"]
    assert meta["authors"] == "Test Lab" and meta["required_packages_version"]["lung-effnet"]
    assert meta["version"] in meta["changelog"]
    assert str(tiny_model_dir) not in json.dumps(meta)  # no local paths (nor anything per patient) in the metadata


def test_monai_verify_net_in_out_passes(bundle):
    done = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                         "--config_file", "configs/inference.json", "--device", "cpu", cwd=bundle)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verified with no error" in done.stdout + done.stderr


def test_monai_bundle_run_reproduces_predict_proba(bundle, tiny_model_dir, slices, tmp_path, read_csv):
    out = tmp_path / "results"
    done = _monai_bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(bundle),
                         "--dataset_dir", str(slices), "--output_dir", str(out), "--device", "$torch.device('cpu')",
                         cwd=bundle)
    assert done.returncode == 0, done.stderr[-2000:]

    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 6 and sum(r["path"].startswith("series/") for r in rows) == 3
    got = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    expected = load_model(tiny_model_dir).predict_proba([slices / r["path"] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in expected.argmax(1)]
    assert len({tuple(p) for p in got.round(4)}) > 1  # the slices are told apart: the comparison has teeth
    errors = read_csv(out / "errors.csv")
    assert [e["path"] for e in errors] == ["broken.dcm"] and errors[0]["reason"]


def test_torchscript_matches_the_ensemble(bundle, tiny_model_dir):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    if not (bundle / "models" / "model.ts").is_file():  # allowed, when the metadata says why
        assert meta["lung_effnet"]["torchscript"].startswith("no models/model.ts")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 marks torch.jit deprecated
        scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu")
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = load_model(tiny_model_dir).predict_proba(x)
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).double().numpy(), expected, atol=1e-5, rtol=0)


def test_export_bundle_help_says_how_to_run_it(capsys):
    with pytest.raises(SystemExit):
        main(["export-bundle", "--help"])
    out = capsys.readouterr().out
    assert "usage: lung-effnet export-bundle" in out
    assert "python -m monai.bundle run" in out and "predictions.csv" in out


@pytest.mark.parametrize("make_model, words", [
    (lambda t: t / "no" / "model", ["MODEL: not found", "no/model"]),
    (lambda t: t, ["not a model directory"]),
])
def test_a_missing_model_folder_is_one_line(tmp_path, capsys, make_model, words):
    code = main(["export-bundle", str(make_model(tmp_path)), "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "bundle").exists()


def test_an_out_folder_holding_other_files_is_refused(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code = main(["export-bundle", str(tiny_model_dir), "--out", str(tmp_path / "busy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not empty and not a bundle" in err[0], err
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
