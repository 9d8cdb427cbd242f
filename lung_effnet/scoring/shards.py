"""``score --shard i/N``: a deterministic, disjoint share of an archive's series for one job.

Which shard a thing belongs to depends on its own name only, never on what else is in the
archive, so adding a study elsewhere moves no other series between shards:

- a DICOM series: ``shard_of(SeriesInstanceUID)`` (as found in the headers, before any
  ``--pseudonymize-uids``);
- a NIfTI volume or a 2D image: ``shard_of(its path relative to --input)``; 2D images are
  sharded one by one and then grouped into decode units within their shard;
- every other ledger row (a file of no unit: a localizer, an SR, a text file, an unreadable
  header, a folder the walk could not enter): the shard of its unit when one of the shard's units
  lists it, else ``shard_of(its series_uid)`` when the header pass found one (a skipped series
  stays together), else ``shard_of(its relative path)``.

``shard_of(key) = int.from_bytes(blake2b(key, 8 bytes), "big") % N`` (Python's ``hash`` is salted
per process). Every input file therefore lands in exactly one shard's ``files.csv``; a shard's
ledger, error rows and summary counts hold its own files only, so the shards' ledgers, joined,
are the unsharded ledger (``merge``).

A finished shard writes ``parts/shard.json`` (``write_shard_manifest``): its index and count, its
units (key and files, as its resume records name them), its header-pass ledger rows and a digest
of the whole archive's inventory, so that ``merge`` can check that all shards saw the same input.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lung_effnet.errors import InputError
from lung_effnet.io.ledger import Ledger
from lung_effnet.scoring.discover import IMAGES, Discovery, ScoreUnit
from lung_effnet.scoring.journal import write_atomic

MANIFEST = "shard.json"
"""The file under ``<shard out>/parts/`` that marks a finished shard (``write_shard_manifest``)."""
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``0 <= index < count``)."""

    index: int
    count: int

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise InputError(f"--shard: need i/N with N >= 1 and 0 <= i < N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` -> ``Shard(i, N)``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise InputError(f"--shard: expected i/N (e.g. 0/4), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder_name(self) -> str:
        """``shard_<i>_of_<N>``: the shard's output folder under ``<--out>/shards/``."""
        return f"shard_{self.index}_of_{self.count}"

    def as_dict(self) -> dict:
        return {"index": self.index, "count": self.count}

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index


def shard_of(key: str, count: int) -> int:
    """The shard (``0..count-1``) of a series key or relative path: a stable hash (blake2b), the
    same in every process and on every machine. Undecodable path bytes (surrogates) hash as the
    bytes found."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def unit_shard(unit: ScoreUnit, count: int) -> int:
    """A DICOM series' or a volume's shard (its key: the Series Instance UID, or the relative path).
    Not for a group of 2D images, which are sharded image by image (``select_shard``)."""
    return shard_of(unit.key, count)


def select_shard(discovery: Discovery, shard: Shard, group_size: int) -> Discovery:
    """The part of ``discovery`` (of the whole archive, UIDs as found) that belongs to ``shard``
    (module docstring): its units (2D images regrouped by ``group_size`` within the shard), and the
    header-pass ledger rows of its files; ``n_files`` counts the files this shard accounts for."""
    owner: dict[str, int] = {}
    units: list[ScoreUnit] = []
    images: list[str] = []
    for unit in discovery.units:
        if unit.kind == IMAGES:
            for rel in unit.files:
                owner[rel] = shard_of(rel, shard.count)
                if owner[rel] == shard.index:
                    images.append(rel)
            continue
        owner.update(dict.fromkeys(unit.files, unit_shard(unit, shard.count)))
        if owner[unit.files[0]] == shard.index:
            units.append(unit)
    root = next((u.root for u in discovery.units), "")
    for start in range(0, len(images), group_size):
        group = images[start:start + group_size]
        units.append(ScoreUnit(IMAGES, f"{group[0]}..{group[-1]}", group, root, len(group)))
    rows, stages = {}, {}
    for path, row in discovery.ledger.rows.items():
        at = owner.get(path)
        if at is None:
            at = shard_of(row["series_uid"] or path, shard.count)
        if at == shard.index:
            rows[path] = row
            if path in discovery.ledger.stages:
                stages[path] = discovery.ledger.stages[path]
    mine = set(rows) | {f for u in units for f in u.files}
    return Discovery(units, Ledger(rows, stages), len(mine))


def inventory_digest(discovery: Discovery) -> str:
    """A digest of what the whole archive holds (every unit's files, every header-pass ledger path
    and the file count; no UID), equal for two shards only when both saw the same input."""
    h = hashlib.blake2b(digest_size=16)
    parts = sorted("\0".join(u.files) for u in discovery.units) + ["\1"] + sorted(discovery.ledger.rows)
    for part in parts + [str(discovery.n_files)]:
        h.update(part.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def write_shard_manifest(out_dir: Path, shard: Shard, discovery: Discovery, inventory: str, n_files_total: int) -> None:
    """``<out>/parts/shard.json``, written last by a shard run: ``discovery`` is the shard's, as its
    records name it (pseudonyms when ``--pseudonymize-uids``). Paths keep undecodable bytes as JSON
    ``\\udcXX`` escapes, so they read back as the ledger keys they were."""
    manifest = {"version": MANIFEST_VERSION, "shard": shard.as_dict(), "inventory": inventory,
                "n_files_total": n_files_total, "n_files": discovery.n_files,
                "units": [{"key": u.key, "files": u.files} for u in discovery.units],
                "ledger": {"rows": list(discovery.ledger.rows.values()), "stages": discovery.ledger.stages}}
    write_atomic(Path(out_dir) / "parts" / MANIFEST, json.dumps(manifest) + "\n")


def read_shard_manifest(shard_dir: Path) -> dict:
    """The manifest of a finished shard; ``InputError`` (one line) when there is none."""
    path = Path(shard_dir) / "parts" / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{shard_dir}: not a finished shard of 'score --shard' (no parts/{MANIFEST}); "
                         "run or resume that shard first") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({type(exc).__name__})") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    return manifest


def manifest_discovery(manifest: dict) -> Discovery:
    """The shard's discovery as far as the outputs need it (units carry key and files only)."""
    rows = {r["path"]: r for r in manifest["ledger"]["rows"]}
    units = [ScoreUnit("", u["key"], u["files"], "", 0) for u in manifest["units"]]
    return Discovery(units, Ledger(rows, dict(manifest["ledger"]["stages"])), manifest["n_files"])

