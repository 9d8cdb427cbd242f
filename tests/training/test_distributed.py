"""A fold on several processes (``torchrun``): the sampler's split of each balanced batch, and two gloo
processes on CPU training like one, with rank 0 alone writing."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lung_effnet.config import load_config
from lung_effnet.models.predictor import build_member
from lung_effnet.training import distributed
from lung_effnet.training.fold import FoldData, FoldTrainer, epoch_order, rank_share
from tests.training.test_fold import disks

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("batch_size, world", [(32, 2), (8, 3)])  # 8 rows on 3 ranks: shares of 3, 3 and 2
def test_rank_shares_split_each_balanced_batch_without_losing_the_balance(batch_size, world):
    """Every rank draws the single process's balanced row order (same seed) and takes a stride of each
    batch: the shares are disjoint, together they are the batch, and each is still class-balanced."""
    y = torch.tensor([0] * 360 + [1] * 150 + [2] * 90)  # 60% / 25% / 15%
    order = epoch_order(y, "sampler", torch.Generator().manual_seed(0))
    assert torch.equal(order, epoch_order(y, "sampler", torch.Generator().manual_seed(0)))  # the same on every rank
    seen: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for step in range(len(y) // batch_size):
        batch = order[step * batch_size:(step + 1) * batch_size]
        positions = [torch.arange(batch_size)[rank_share(batch_size, r, world)] for r in range(world)]
        assert torch.equal(torch.sort(torch.cat(positions)).values, torch.arange(batch_size))  # disjoint, all rows
        assert max(map(len, positions)) - min(map(len, positions)) <= 1
        shares = [batch[rank_share(batch_size, r, world)] for r in range(world)]
        assert torch.equal(torch.sort(torch.cat(shares)).values, torch.sort(batch).values)  # union = the batch
        for r, share in enumerate(shares):
            seen[r].append(share)
    for rows in seen:
        fractions = torch.bincount(y[torch.cat(rows)], minlength=3).double() / len(torch.cat(rows))
        assert fractions.min() > 0.25 and fractions.max() < 0.42, fractions  # ~1/3 each, not 60/25/15


def test_each_rank_trains_on_its_share_of_the_single_process_batch(tmp_path):
    """``FoldTrainer.batches`` of rank r of 3 (set by hand: no process group) yields rows r, r+3, ... of
    the single process's batches, bit for bit: the same augmentation, mixup partners and lesion masks."""
    rng = np.random.default_rng(0)
    x, y = disks(40, 32, rng)
    masks, known = (x > 0.6).to(torch.uint8), torch.arange(40) % 3 != 0
    cfg = load_config("demo_cpu", ["data.image_size=32", "data.context_slices=0", "train.batch_size=8",
                                   "augment.mixup_alpha=0.4", "train.channels_last=false"])

    def batches(rank: int, world: int) -> list:
        torch.manual_seed(0)
        trainer = FoldTrainer(build_member(cfg), FoldData(x, y, x[:0], y[:0], masks, known), cfg, tmp_path / "f", seed=3)
        assert trainer.lesion_head is not None and trainer.world == 1  # no process group here
        trainer.rank, trainer.world = rank, world
        return list(trainer.batches())

    whole = batches(0, 1)
    shares = [batches(r, 3) for r in range(3)]
    assert len(whole) == 5 and all(len(s) == 5 for s in shares)
    for step, batch in enumerate(whole):
        assert batch.y_mix is not None and batch.masks is not None
        for r in range(3):
            part = shares[r][step]
            rows = slice(r, None, 3)
            for name in ("x", "y", "masks", "known", "y_mix"):
                assert torch.equal(getattr(part, name), getattr(batch, name)[rows]), (step, r, name)
            assert part.lam == batch.lam


def test_collective_helpers_are_plain_calls_in_one_process():
    """Without torchrun: rank 0 of 1, and ``on_main`` / ``main_first`` / ``from_main`` just call or return."""
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.on_main(lambda: 7) == 7 and distributed.main_first(lambda: "x") == "x"
    assert distributed.from_main([1, 2]) == [1, 2]
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(KeyError):
        distributed.on_main(lambda: {}["missing"])
    assert distributed.init_from_env(torch.device("cpu")) is False and not distributed.is_initialized()


RANK_GUARD = '''
"""``lung-effnet`` for torchrun, where a rank other than 0 may not write under WATCHED: any attempt is
printed (RANK-WRITE) and refused."""
import os
import sys

WATCHED = os.path.realpath(os.environ["LUNG_EFFNET_TEST_WATCHED"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def refuse_writes(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link",
                   "os.chmod", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "sqlite3.connect"):
        path, writing = args[0], True
    else:
        return
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        where = os.path.realpath(os.fsdecode(path))
        if where == WATCHED or where.startswith(WATCHED + os.sep):
            print(f"RANK-WRITE rank {os.environ['RANK']}: {event} {where}", file=sys.stderr, flush=True)
            raise PermissionError(f"rank {os.environ['RANK']} may not write {where}")


if os.environ.get("RANK", "0") != "0":
    sys.addaudithook(refuse_writes)

from lung_effnet.cli import main  # noqa: E402

sys.exit(main())
'''

FOLD_WORKER = '''
"""One FoldTrainer.fit on fixed images, BatchNorm frozen to its running statistics (see the test):
in one process, or as every rank of a torchrun job; rank 0 saves the final weights and the history."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lung_effnet.config import load_config
from lung_effnet.models.predictor import build_member
from lung_effnet.training import distributed
from lung_effnet.training.fold import FoldData, FoldTrainer
from tests.training.test_fold import disks

out = Path(sys.argv[1])
distributed.init_from_env(torch.device("cpu"))
rng = np.random.default_rng(0)
x, y = disks(30, 32, rng)
val_x, val_y = disks(12, 32, rng)
cfg = load_config("demo_cpu", ["data.image_size=32", "data.context_slices=0", "train.batch_size=7", "train.epochs=2",
                               "model.dropout=0.0", "model.drop_connect=0.0", "augment.mixup_alpha=0.4"])
torch.manual_seed(0)
model = build_member(cfg)
for norm in model.modules():
    if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        norm.forward = (lambda m: lambda t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias,
                                                         False, 0.0, m.eps))(norm)
masks = (x > 0.6).to(torch.uint8)
trainer = FoldTrainer(model, FoldData(x, y, val_x, val_y, masks, torch.ones(len(y), dtype=torch.bool)), cfg,
                      out / "fold", seed=0)
result = trainer.fit(progress=False)
if distributed.is_main():
    torch.save(trainer.model.state_dict(), out / "final.pt")
    (out / "history.json").write_text(json.dumps(result["history"]))
'''


def test_two_gloo_ranks_compute_the_single_process_fold_when_batchnorm_is_frozen(tmp_path):
    """What a fold on 2 ranks differs in from one process, by design, is BatchNorm's batch statistics
    (each rank normalises its share). Frozen to running statistics (and no dropout), the two must
    train the same network: same batches and augmentation on every rank, each share's loss weighted
    by its rows (a global batch of 7: shares of 4 and 3), DDP's averaged gradient plus the lesion head's,
    the same optimizer and scheduler steps, rank 0's evaluation sent to both. Only float sums differ
    in order; Adam can turn that into updates of ~lr * eps-scale on near-zero gradients, hence 1e-4."""
    worker = tmp_path / "fold_worker.py"
    worker.write_text(FOLD_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run_killing_the_group([sys.executable, str(worker), str(one)], env, timeout=120)
    assert single.returncode == 0, single.stdout[-3000:]
    pair = _run_killing_the_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                   f"--master_port={_free_port()}", str(worker), str(two)], env, timeout=180)
    assert pair.returncode == 0, pair.stdout[-3000:]

    history_one, history_two = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert len(history_one) == len(history_two) == 2
    for a, b in zip(history_one, history_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_auroc_macro"] == pytest.approx(a["val_auroc_macro"], abs=1e-6)
        assert b["lr"] == a["lr"]
    state_one, state_two = (torch.load(d / "final.pt", weights_only=True) for d in (one, two))
    assert state_one.keys() == state_two.keys()
    for key in state_one:
        torch.testing.assert_close(state_two[key], state_one[key], rtol=0, atol=1e-4, msg=key)
    assert sorted(p.name for p in two.iterdir()) == ["final.pt", "fold", "history.json"]


# The plain EfficientNet: the tolerances below were measured on it. A member with a lesion finder is
# covered exactly by the frozen-BatchNorm test above (demo_cpu's member, finder included).
SETTINGS = ["data.image_size=32", "data.context_slices=0", "train.epochs=2", "train.batch_size=8", "cv.folds=2",
            "train.val_fraction=0", "data.slices=all", "report.enabled=false", "tracking.experiment=ddp",
            "model.lesion_finder=null", "model.pretrained_weights=builtin:phantom-b0-96px-2.5d"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_killing_the_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own, killed with all its processes (torchrun's workers) on timeout."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank waiting at a collective?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _oof(path: Path) -> np.ndarray:
    with open(path, newline="") as fh:
        return np.array([[float(r[f"p_{c}"]) for c in ("benign", "malignant", "normal")] for r in csv.DictReader(fh)])


def _train_losses(uri: str) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    return {r.data.tags["mlflow.runName"]: [m.value for m in client.get_metric_history(r.info.run_id, "train_loss")]
            for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_two_gloo_processes_train_a_run_like_one_process_and_only_rank_0_writes(tmp_path):
    """``torchrun --nproc_per_node=2 <lung-effnet> train`` on CPU (gloo), 2 folds of 24 training slices,
    2 epochs of 3 steps: one set of outputs (the same files as one process writes), one MLflow parent
    run with its 2 fold runs, rank 1 never writing under ``tmp_path`` (an audit hook refuses it), and
    numbers within noise of the same run in one process (see the tolerances below)."""
    from mlflow.tracking import MlflowClient

    from lung_effnet.synthetic.dataset import write_synthetic_dataset
    from lung_effnet.training.cv import run_cv

    data = write_synthetic_dataset(tmp_path / "data", "nifti", n_patients=8, seed=5, size_px=48, n_slices=6,
                                   progress=False)
    guard = tmp_path / "rank_guard.py"
    guard.write_text(RANK_GUARD)
    cache, two, one = tmp_path / "cache", tmp_path / "two", tmp_path / "one"
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    env = {**os.environ, "LUNG_EFFNET_TEST_WATCHED": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    sets = [a for s in [*SETTINGS, f"data.cache_dir={cache}"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(guard), "train", "-q", "--data", str(data), "--labels", str(data / "labels.csv"), "--out", str(two),
           "--tracking-uri", uri, *sets]
    result = _run_killing_the_group(cmd, env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RANK-WRITE" not in result.stdout, result.stdout[-3000:]
    assert result.stdout.count("Cross-validation (") == 1  # rank 0 alone reports

    # The same run in this process (its cache filled by rank 0 of the run above).
    cfg = load_config(None, [*SETTINGS, f"data.cache_dir={cache}"])
    run_cv(data, one, cfg, labels_csv=data / "labels.csv", tracking_uri=f"sqlite:///{tmp_path / 'one.db'}",
           progress=False)

    assert _files(two) == _files(one)  # one set of outputs: nothing per rank, nothing missing
    assert sorted(p.name for p in (two / "model").iterdir()) == ["config.yaml", "fold_0.pt", "fold_1.pt", "model.json",
                                                                 "training_data.json"]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 3 and len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["mlflow.runName"] for r in runs if r.data.tags.get("mlflow.parentRunId")
                  == parents[0].info.run_id) == ["fold-0", "fold-1"]

    # Within noise, and no closer: both runs draw the same batches and augmentation and start from the same
    # weights, but each rank normalises BatchNorm over its own 4 rows (one process: 8), which at 32 px sends
    # 6 Adam steps elsewhere (the exact equivalence is the frozen-BatchNorm test above). Measured on this
    # setup (seeds 0 and 1), the gap to one process is below the gap between two seeds of one process:
    # out-of-fold probabilities 0.11-0.13 apart on average (seed to seed: 0.14-0.17), epoch-0 training loss
    # 6-29% apart (across seeds: 2.1-3.2); OOF AUROC, on 48 slices of 8 patients, spans 0.23-0.73 across
    # seeds: not compared. Hence 0.3 and 50%, the spread a seed causes (the exact check: the test above).
    loss_two, loss_one = _train_losses(uri), _train_losses(f"sqlite:///{tmp_path / 'one.db'}")
    for fold in ("fold-0", "fold-1"):
        assert len(loss_two[fold]) == 2 and np.isfinite(loss_two[fold]).all()
        assert loss_two[fold][0] == pytest.approx(loss_one[fold][0], rel=0.5), (loss_two, loss_one)
    gap = np.abs(_oof(two / "oof_predictions.csv") - _oof(one / "oof_predictions.csv")).mean()
    assert gap < 0.3, gap
    auroc = json.loads((two / "cv_summary.json").read_text())["oof"]["auroc_macro"]
    assert 0.0 <= auroc <= 1.0
