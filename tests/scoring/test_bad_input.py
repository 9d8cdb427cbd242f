"""``score`` on inputs that used to give a silent or wrong result, a traceback or the wrong exit code:
NaN pixels, 12-bit PNG, colliding and long saliency page names, --out = --input, nothing usable,
undecodable names, symlink loops, unreadable folders, an unwritable --out, and kill -9 with workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from lung_effnet.io.volume import NON_FINITE, canonical_affine, write_nifti
from lung_effnet.scoring.discover import discover
from lung_effnet.scoring.prepare import finish_unit, prepare_unit
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from tests.scoring.test_score import _run_cli

LONG = ["x" * 90, "y" * 90, "z" * 90]  # a relative path of ~290 characters, each part a valid name


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    """A 2-fold b0 ensemble at 32 px, untrained (these tests are about rows and exit codes)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sources")
    dicom = write_synthetic_dataset(tmp / "dicom", "dicom", n_patients=2, seed=1, size_px=32, n_slices=4, progress=False)
    nifti = write_synthetic_dataset(tmp / "nifti", "nifti", n_patients=1, seed=2, size_px=32, n_slices=3, progress=False)
    jpg = write_synthetic_dataset(tmp / "jpg", "jpg", n_patients=1, seed=3, size_px=32, n_slices=3, progress=False)
    return {"series": [dicom / "P0001", dicom / "P0002"], "volume": nifti / "P0001" / "ct.nii.gz",
            "jpg": sorted(jpg.rglob("*.jpg"))[0]}


def _set_slope(path: Path, value: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "NaN" is no valid DS: that is the point
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = value
        ds.save_as(path)


def _nan_volume(path: Path) -> Path:
    hu = np.full((3, 16, 16), np.nan, np.float32)
    return write_nifti(path, hu, canonical_affine((1.0, 1.0, 1.0)), dtype=np.float32)


def _score(model: Path, root: Path, out: Path, *extra: str) -> tuple[int, str]:
    return _run_cli(["score", "-q", "--model", str(model), "--input", str(root), "--out", str(out),
                     "--workers", "0", "--batch-size", "4", *extra])


def test_non_finite_pixels_fail_their_file_or_series_and_get_no_prediction(model, sources, tmp_path, read_csv):
    root = tmp_path / "in"
    shutil.copytree(sources["series"][0], root / "all_nan")
    shutil.copytree(sources["series"][1], root / "one_nan")
    for f in (root / "all_nan").glob("*.dcm"):
        _set_slope(f, "NaN")
    one = sorted((root / "one_nan").glob("*.dcm"))[1]
    _set_slope(one, "NaN")
    _nan_volume(root / "nan.nii.gz")  # no voxel below -200 HU reads False for NaN: it was scored "benign"
    code, printed = _score(model, root, tmp_path / "out")
    assert code == 0, printed
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [(r["path"], r["status"], r["n_slices"]) for r in rows] == [("one_nan", "incomplete", "3")]
    errors = {r["path"]: r for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert NON_FINITE in errors["nan.nii.gz"]["reason"] and NON_FINITE in errors[f"one_nan/{one.name}"]["reason"]
    assert all(NON_FINITE in e["reason"] for p, e in errors.items() if p.startswith("all_nan/"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["series_failed"] == 2 and summary["counts"]["files"]["failed"] == 4 + 1 + 1


def test_a_12_bit_png_reaches_the_model_in_full_range(model, tmp_path):
    yy, xx = np.mgrid[:48, :48]
    body = (yy - 24) ** 2 + (xx - 24) ** 2 < 20 ** 2
    plane = np.where(body, 1000 + (xx * 60) % 3000, 0).astype(np.uint16)  # 12-bit values, up to 4095
    plane[24, 20:28] = 4095
    Image.fromarray(plane).save(tmp_path / "ct12.png")
    (unit,) = discover(tmp_path, progress=False).units
    import lung_effnet

    cfg = lung_effnet.load_model(model).config.data
    prepared = prepare_unit(unit, cfg)
    # 2D images cross from the workers pickled, not as shared-memory tensors: each of those holds a
    # file descriptor in the scoring process, and units of 64 images exhausted a 1,024 limit
    assert all(isinstance(v.planes, np.ndarray) for v in prepared.volumes)
    assert finish_unit(prepared, cfg).max() > 0.8  # divided by 257 it was below 0.07


def test_saliency_pages_of_colliding_and_long_paths_are_distinct(model, sources, tmp_path, read_csv):
    root = tmp_path / "in"
    for rel in ("a/b.jpg", "a_b.jpg", "/".join(LONG) + "/slice.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources["jpg"], root / rel)
    out = tmp_path / "out"
    code, printed = _score(model, root, out, "--saliency")
    assert code == 0, printed  # the 290-character path crashed the run (file name too long)
    rows = read_csv(out / "predictions.csv")
    pages = [r["report"] for r in rows]
    assert len(rows) == 3 and len(set(pages)) == 3  # a/b.jpg and a_b.jpg shared one page
    for row in rows:
        assert len(Path(row["report"]).name) < 120
        assert f"({row['path']})" in (out / row["report"]).read_text()  # each page shows its own image


def test_out_must_not_be_or_hold_the_input(model, sources, tmp_path, read_csv):
    root = tmp_path / "in"
    shutil.copytree(sources["series"][0], root / "s")
    for out in (root, tmp_path):  # --out = --input, --input inside --out
        code, printed = _score(model, root, out)
        assert code == 2 and printed.count("\n") == 1 and "--out" in printed, printed
        assert not (root / "predictions.csv").exists() and not (tmp_path / "predictions.csv").exists()
    code, printed = _score(model, root, root / "scores")  # inside the input: allowed, left out of the walk
    assert code == 0, printed
    code, printed = _score(model, root, root / "scores")
    assert code == 0 and len(read_csv(root / "scores" / "files.csv")) == 4, printed


def test_nothing_scorable_is_exit_3_after_the_outputs_and_an_empty_input_exit_2(model, tmp_path):
    root = tmp_path / "in"
    _nan_volume(root / "nan.nii.gz")
    (root / "notes.txt").write_text("x")
    code, printed = _score(model, root, tmp_path / "out")
    last = printed.strip().splitlines()[-1]  # after the summary table, one error line
    assert code == 3 and last.startswith("lung-effnet score: error: none of the 2") and "errors.csv" in last, printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["files"] == {"total": 2, "used": 0, "skipped": 1, "failed": 1}
    assert (tmp_path / "out" / "errors.csv").read_text().count("\n") == 3
    (tmp_path / "empty").mkdir()
    code, printed = _score(model, tmp_path / "empty", tmp_path / "out2")
    assert code == 2 and printed.count("\n") == 1 and "no files found" in printed, printed


def test_undecodable_names_and_symlink_loops_are_rows(model, sources, tmp_path, read_csv):
    root = tmp_path / "in"
    shutil.copytree(sources["series"][0], root / "s")
    shutil.copy(sources["jpg"], root / os.fsdecode(b"caf\xe9.jpg"))
    os.symlink("self.dcm", root / "self.dcm")
    code, printed = _score(model, root, tmp_path / "out")
    assert code == 0, printed
    errors = {r["path"]: (r["stage"], r["reason"]) for r in read_csv(tmp_path / "out" / "errors.csv")}
    assert errors == {"caf\\xe9.jpg": ("walk", "file name is not valid UTF-8: rename it to use it"),
                      "self.dcm": ("walk", "symlink loop")}
    assert len(read_csv(tmp_path / "out" / "files.csv")) == 6


def test_an_unreadable_folder_is_an_error_row_and_counted(model, sources, tmp_path, locked_folders, read_csv):
    """As os.walk sees a folder it may not list (the real thing, slower, is the next test)."""
    root = tmp_path / "in"
    shutil.copytree(sources["series"][0], root / "open")
    shutil.copytree(sources["series"][1], root / "locked")
    code, printed = _score(model, root, tmp_path / "out")
    assert code == 0, printed
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert errors == [{"path": "locked/", "stage": "walk", "reason": "folder not readable: Permission denied"}]
    files = json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["files"]
    assert files == {"total": 5, "used": 4, "skipped": 0, "failed": 1}


@pytest.mark.slow  # a score subprocess without root's permission bypass: ~20 s on 2 cores
def test_an_unreadable_folder_is_an_error_row_for_a_non_root_user(model, sources, unprivileged, read_csv):
    run, base = unprivileged
    root = base / "in"
    shutil.copytree(sources["series"][0], root / "open")
    shutil.copytree(sources["series"][1], root / "locked")
    (root / "locked").chmod(0)
    try:
        done = run(["score", "-q", "--model", model, "--input", root, "--out", base / "out", "--workers", "0"])
    finally:
        (root / "locked").chmod(0o755)
    assert done.returncode == 0, done.stderr
    errors = read_csv(base / "out" / "errors.csv")
    assert errors == [{"path": "locked/", "stage": "walk", "reason": "folder not readable: Permission denied"}]
    files = json.loads((base / "out" / "summary.json").read_text())["counts"]["files"]
    assert files == {"total": 5, "used": 4, "skipped": 0, "failed": 1}


def test_an_unwritable_out_is_one_line_and_exit_2(model, sources, unprivileged):
    run, base = unprivileged
    shutil.copytree(sources["series"][0], base / "in")
    (base / "ro").mkdir()
    (base / "ro").chmod(0o555)
    done = run(["score", "-q", "--model", model, "--input", base / "in", "--out", base / "ro" / "out"])
    (base / "ro").chmod(0o755)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert "--out: cannot write to" in err[0] and "Permission denied" in err[0]


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not collected it yet


@pytest.mark.slow  # ~15 s alone on 2 cores (the worker's start imports torch), more under load
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_workers_and_forkserver_end_when_score_is_killed(model, sources, tmp_path):
    """kill -9 of score left its forkserver and a worker (~450 MB) running for good: a worker holds
    its task queue's write end and the forkserver's "alive" pipe, so neither ever saw the end."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(6):
        shutil.copy(sources["volume"], root / f"v{i}.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lung_effnet.cli", "score", "-q", "--model", str(model), "--input",
                             str(root), "--out", str(tmp_path / "out"), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: set[int] = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            family = _descendants(proc.pid)
            if any(_descendants(p) for p in family):  # the forkserver has forked a worker
                break
            time.sleep(0.05)
        assert proc.poll() is None and family, "the run ended before a worker was seen"
        family = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in family):
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)], "processes of the killed run are still running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in family:  # what a failed check left behind (processes this test started)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
