"""Sharded scoring: ``score --shard i/N``, ``merge-scores`` and ``score --executor local|slurm --shards N``
on the mixed phantom archive of ``test_score``: shards are disjoint and cover every series and file,
stay put when the archive grows, and merged equal one unsharded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lung_effnet.classes import CLASSES
from lung_effnet.io.dicom_index import list_files
from lung_effnet.scoring.discover import DICOM, IMAGES, discover
from lung_effnet.scoring.shards import Shard, select_shard, shard_of
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from tests.scoring.test_score import OUTPUTS, _run_cli, archive  # noqa: F401 - fixtures

RUN_TIMING = ("wall_s", "series_per_min", "slices_per_s", "units_scored", "units_resumed")
"""The keys of summary.json's ``run`` that differ between a merged and an unsharded run: timings, and
decode units (2D images are grouped within their shard)."""


def _score(model, root, out, *extra):
    return _run_cli(["score", "-q", "--model", str(model), "--input", str(root), "--out", str(out), "--workers", "0",
                     "--batch-size", "4", *extra])


def _owners(root: Path, count: int) -> tuple[dict[str, int], dict[str, int]]:
    """``(series -> shard, file -> shard)`` of every shard of a ``count``-way split, checking that no
    series or file is in two shards. Series: DICOM UIDs, volume paths and image paths."""
    full = discover(root, progress=False)
    series: dict[str, int] = {}
    files: dict[str, int] = {}
    for i in range(count):
        part = select_shard(full, Shard(i, count), group_size=4)
        mine = set(part.ledger.rows) | {f for u in part.units for f in u.files}
        assert part.n_files == len(mine)
        for key in [f for u in part.units if u.kind == IMAGES for f in u.files] + [u.key for u in part.units if u.kind != IMAGES]:
            assert key not in series, f"{key} in shards {series[key]} and {i}"
            series[key] = i
        for path in mine:
            assert path not in files, f"{path} in shards {files[path]} and {i}"
            files[path] = i
    return series, files


def test_shards_are_disjoint_and_cover_every_series_and_file(archive):  # noqa: F811 - fixture
    root, facts = archive
    full = discover(root, progress=False)
    series, files = _owners(root, 3)
    expected = {u.key for u in full.units if u.kind != IMAGES} | {f for u in full.units if u.kind == IMAGES for f in u.files}
    assert set(series) == expected and facts["uids"] <= set(series)
    assert sorted(files) == sorted(p.relative_to(root).as_posix() for p in list_files(root)) and len(files) == full.n_files
    assert len(set(series.values())) > 1  # the split splits
    for uid in facts["uids"]:  # a series' files (localizers of its study aside) are in its shard
        unit = next(u for u in full.units if u.key == uid)
        assert {files[f] for f in unit.files} == {series[uid]} == {shard_of(uid, 3)}
    assert _owners(root, 1)[1] == dict.fromkeys(files, 0)


def test_hash_is_stable_and_shard_option_is_checked():
    """blake2b, not Python's salted ``hash``: these values hold in every process, on every machine."""
    assert [shard_of("1.2.840.113619.2.55.3", n) for n in (2, 3, 4, 7)] == [1, 1, 3, 2]
    assert shard_of("img/slice.jpg", 1000) == 351
    assert Shard.parse(" 2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_a_new_study_elsewhere_moves_no_series_between_shards(archive, tmp_path):  # noqa: F811 - fixture
    root, _ = archive
    grown = tmp_path / "grown"
    shutil.copytree(root, grown)
    extra = write_synthetic_dataset(tmp_path / "extra", "dicom", n_patients=1, seed=9, size_px=48, n_slices=4, progress=False)
    shutil.copytree(extra / "P0001", grown / "aaa_new_study")
    shutil.copy(grown / "img" / "slice.jpg", grown / "img" / "another.jpg")
    (grown / "study_a" / "readme.txt").write_text("new\n")
    for count in (2, 3, 5):
        series, files = _owners(root, count)
        series_after, files_after = _owners(grown, count)
        assert {k: series_after[k] for k in series} == series
        assert {k: files_after[k] for k in files} == files
        new_uids = {u.key for u in discover(grown, progress=False).units if u.kind == DICOM} - set(series)
        assert len(new_uids) == 1 and set(series_after) - set(series) == new_uids | {"img/another.jpg"}


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, archive, tmp_path_factory):  # noqa: F811 - fixture
    """The archive scored once unsharded and as 3 shards, with saliency pages, and the shards merged."""
    base = tmp_path_factory.mktemp("sharded")
    code, printed = _score(tiny_model_dir, archive[0], base / "whole", "--saliency")
    assert code == 0, printed
    dirs = [base / f"shard{i}" for i in range(3)]
    for i, folder in enumerate(dirs):
        code, printed = _score(tiny_model_dir, archive[0], folder, "--saliency", "--shard", f"{i}/3")
        assert code == 0, printed
        assert "merge-scores" in printed
    code, printed = _run_cli(["merge-scores", "-q", *map(str, reversed(dirs)), "--out", str(base / "merged")])
    assert code == 0, printed
    return base, dirs


def test_three_shards_merged_equal_the_unsharded_run(sharded, read_csv):
    base, dirs = sharded
    whole, merged = base / "whole", base / "merged"
    for name in OUTPUTS:
        assert (merged / name).read_bytes() == (whole / name).read_bytes(), name
    pages = sorted(p.relative_to(whole) for p in (whole / "reports").iterdir())
    assert pages and sorted(p.relative_to(merged) for p in (merged / "reports").iterdir()) == pages
    assert all((merged / p).read_bytes() == (whole / p).read_bytes() for p in pages)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, merged))
    assert b["counts"] == a["counts"]
    assert set(b) - set(a) == {"shards"} and [s["dir"] for s in b["shards"]] == list(map(str, dirs))
    assert {k: v for k, v in b.items() if k not in ("run", "shards")} == {k: v for k, v in a.items() if k != "run"}
    assert {k: v for k, v in b["run"].items() if k not in RUN_TIMING} == {k: v for k, v in a["run"].items() if k not in RUN_TIMING}
    assert b["run"]["wall_s"] == pytest.approx(sum(json.loads((d / "summary.json").read_text())["run"]["wall_s"] for d in dirs),
                                               abs=0.01)


def test_each_shard_accounts_for_its_own_files_only(sharded, archive, read_csv):  # noqa: F811 - fixture
    base, dirs = sharded
    root, _ = archive
    ledgers = [read_csv(d / "files.csv") for d in dirs]
    paths = [r["path"] for rows in ledgers for r in rows]
    assert sorted(paths) == sorted(r["path"] for r in read_csv(base / "whole" / "files.csv"))  # each file once
    for i, folder in enumerate(dirs):
        summary = json.loads((folder / "summary.json").read_text())
        run = json.loads((folder / "parts" / "run.json").read_text())
        assert summary["shard"] == run["shard"] == {"index": i, "count": 3}
        assert summary["counts"]["files"]["total"] == len(ledgers[i])
        predictions = read_csv(folder / "predictions.csv")
        assert {shard_of(r["series_uid"], 3) for r in predictions} <= {i}  # UIDs as found: the sharding key


def test_merge_refuses_missing_duplicated_or_foreign_shards(sharded, tiny_model_dir, archive, tmp_path):  # noqa: F811
    _, dirs = sharded

    def merge(*folders):
        code, printed = _run_cli(["merge-scores", *map(str, folders), "--out", str(tmp_path / "m")])
        assert code == 2 and printed.count("\n") == 1, printed
        return printed

    assert "shard 1/3 missing" in merge(dirs[0], dirs[2])
    assert "shard 0/3 given twice" in merge(dirs[0], dirs[1], dirs[2], dirs[0])
    assert "not a finished shard" in merge(dirs[0], dirs[1], dirs[2], tmp_path)
    other = _other_model(tiny_model_dir, tmp_path)
    code, printed = _score(other, archive[0], tmp_path / "other1", "--saliency", "--shard", "1/3")
    assert code == 0, printed
    assert "different models" in merge(dirs[0], tmp_path / "other1", dirs[2])
    code, printed = _score(tiny_model_dir, archive[0], tmp_path / "k4", "--shard", "1/4")
    assert code == 0, printed
    assert "different splits" in merge(dirs[0], tmp_path / "k4", dirs[2])
    # a shard's folder resumes that shard only
    code, printed = _score(tiny_model_dir, archive[0], dirs[0], "--saliency", "--shard", "1/3")
    assert code == 2 and "other settings (shard)" in printed
    assert not (tmp_path / "m" / "predictions.csv").exists()


def _other_model(model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with one weight changed: another fingerprint, same files otherwise."""
    import torch

    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    for path in sorted(other.rglob("*.pt")):
        state = torch.load(path, weights_only=True)
        tensors = state if isinstance(state, dict) else {}
        name = next(k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point())
        tensors[name] = tensors[name] + 1e-3
        torch.save(state, path)
        return other
    raise AssertionError(f"no weights file in {model_dir}")


def test_local_executor_runs_shard_jobs_and_merges(sharded, tiny_model_dir, archive, tmp_path, read_csv):  # noqa: F811
    base, _ = sharded
    out = tmp_path / "out"
    code, printed = _run_cli(["score", "-q", "--model", str(tiny_model_dir), "--input", str(archive[0]), "--out", str(out),
                              "--workers", "0", "--batch-size", "4", "--executor", "local", "--shards", "2"])
    assert code == 0, printed
    assert "shard jobs:" in printed and "merge job:" in printed and "Files:" in printed
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["jobs", "shard_0_of_2", "shard_1_of_2"]
    whole = base / "whole"
    for name in ("files.csv", "errors.csv"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    got, expected = read_csv(out / "predictions.csv"), read_csv(whole / "predictions.csv")
    assert [(r["path"], r["series_uid"], r["predicted"]) for r in got] == [(r["path"], r["series_uid"], r["predicted"]) for r in expected]
    # each job runs with its own thread count: CPU convolutions may round differently (1e-6)
    probs = lambda rows: np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])  # noqa: E731
    np.testing.assert_allclose(probs(got), probs(expected), atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == json.loads((whole / "summary.json").read_text())["counts"]


def test_slurm_executor_submits_an_array_and_a_dependent_merge(tiny_model_dir, archive, tmp_path, fake_slurm):  # noqa: F811
    """Against stand-in ``sbatch`` / ``srun`` commands (no SLURM here): one array of N tasks with the
    resources asked for, and a merge job with ``afterok`` on that array; the ids are printed."""
    out = tmp_path / "out"
    code, printed = _run_cli(["score", "-q", "--model", str(tiny_model_dir), "--input", str(archive[0]), "--out", str(out),
                              "--executor", "slurm", "--shards", "3", "--slurm-partition", "gpu", "--gpus-per-shard", "1",
                              "--timeout-min", "30"])
    assert code == 0, printed
    assert "shard jobs: 4000_0, 4000_1, 4000_2; merge job: 4001" in printed
    array, merge = (fake_slurm / "sbatch_4000.sh").read_text(), (fake_slurm / "sbatch_4001.sh").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=30"):
        assert line in array, line
    assert "#SBATCH --dependency=afterok:4000" in merge and "#SBATCH --kill-on-invalid-dep=yes" in merge
    assert "--array" not in merge and not (out / "predictions.csv").exists()
