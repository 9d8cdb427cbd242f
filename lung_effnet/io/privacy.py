"""Pseudonymisation: patient identifiers leave this package only as keyed hashes.

A plain hash of a PatientID can be reversed by hashing candidate IDs (hospital IDs are short);
a keyed hash (HMAC-SHA256) cannot without the key. The key comes from ``LUNG_EFFNET_HASH_KEY``
or, failing that, from a key file created once (mode 0600) at ``~/.config/lung-effnet/hash.key``
(``LUNG_EFFNET_KEY_FILE`` overrides the location). Keep the key to get the same pseudonyms across
runs; anyone holding it and the raw IDs can re-link pseudonyms, so keep it out of shared outputs.

Study and Series Instance UIDs are written as found unless ``UidPseudonyms`` (``--pseudonymize-uids
KEYFILE`` of ``ingest`` and ``score``) replaces them: the same keyed hash, written as a DICOM UID.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from lung_effnet.errors import MissingInputError, UsageError

log = logging.getLogger(__name__)

# Tags whose values must never reach an output, a log line, a report or MLflow (DICOM PS3.15
# basic profile, the patient- and institution-identifying part). Readers copy none of them.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName",
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StationName",
    "StudyID", "MedicalRecordLocator", "IssuerOfPatientID",
)


def _key_file() -> Path:
    return Path(os.environ.get("LUNG_EFFNET_KEY_FILE", Path.home() / ".config" / "lung-effnet" / "hash.key"))


@lru_cache(maxsize=None)
def _load_key(env_key: str | None, key_file: str) -> bytes:
    if env_key:
        return env_key.encode()
    path = Path(key_file)
    if not path.exists():
        # Written whole under a private name, then linked into place: processes that start at once
        # (scoring's header workers) never read a half-written key, and the first link wins.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: rename, unless another process won meanwhile
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def hash_key() -> bytes:
    """The secret key for pseudonyms (see module docstring)."""
    return _load_key(os.environ.get("LUNG_EFFNET_HASH_KEY"), str(_key_file()))


def pseudonym(identifier: str, prefix: str = "P") -> str:
    """Keyed, stable pseudonym of an identifier: ``P-`` + 16 hex digits of HMAC-SHA256.

    An empty identifier stays empty (unknown is not a patient).
    """
    identifier = str(identifier).strip()
    if not identifier:
        return ""
    return f"{prefix}-{keyed_digest(hash_key(), identifier).hex()[:16]}"


def keyed_digest(key: bytes, identifier: str) -> bytes:
    """HMAC-SHA256 of ``identifier`` (UTF-8) under ``key``: the one keyed hash behind every pseudonym."""
    return hmac.new(key, identifier.encode("utf-8"), hashlib.sha256).digest()


UID_ROOT = "2.25"
"""DICOM's root for UIDs made from a 128-bit number (PS3.5 B.2): a pseudonym is still a valid UID."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")  # digits and dots; leading zeros and >64 characters occur in archives too
MIN_KEY_CHARS = 16


def is_dicom_uid(text: str) -> bool:
    """Whether ``text`` looks like a DICOM UID (``1.2.840.113619...``) rather than a path or a name."""
    return bool(_UID.match(text))


# File extensions stripped (case-insensitively) before a path part is compared with a UID: a file
# named ``<uid>.nii.gz`` or ``<uid>.DCM`` carries the UID as much as a folder named ``<uid>``.
_UID_NAME_SUFFIXES = (".nii.gz", ".dcm", ".dicom", ".ima", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_uid_like_name(part: str) -> bool:
    """Whether a folder or file name is a DICOM UID, once a known file extension (``_UID_NAME_SUFFIXES``,
    any case) is removed: ``1.2.840.5``, ``1.2.840.5.dcm``, ``1.2.840.5.nii.gz``, ``1.2.840.5.PNG``."""
    if is_dicom_uid(part):
        return True
    lower = part.lower()
    suffix = next((s for s in _UID_NAME_SUFFIXES if lower.endswith(s)), None)
    return suffix is not None and is_dicom_uid(part[:-len(suffix)])


def warn_uid_like_paths(paths: Iterable[str]) -> None:
    """Paths are written as found, pseudonyms or not: warn when folders or files are named like UIDs."""
    named = {part for path in paths for part in str(path).split("/") if is_uid_like_name(part)}
    if named:
        log.warning("%d folder or file name(s) look like DICOM UIDs: --pseudonymize-uids replaces UID columns, "
                    "not paths; rename them before the outputs leave the hospital", len(named))


def uid_note(uids: UidPseudonyms | None) -> dict:
    """What ``summary.json`` (score) and ``ingest.json`` say about UIDs: pseudonymized (how, and the
    key's fingerprint) or as found."""
    if uids is None:
        return {"uids": "as found"}
    return {"uids": {"pseudonymized": "2.25.<first 16 bytes of HMAC-SHA256(key, UID), decimal>",
                     "key_fingerprint": uids.fingerprint}}


def uid_pseudonym(uid: str, key: bytes) -> str:
    """``2.25.`` + the first 16 bytes of HMAC-SHA256(key, uid) as a decimal integer (at most 44
    characters): stable for one key, unlinkable to ``uid`` without it."""
    return f"{UID_ROOT}.{int.from_bytes(keyed_digest(key, uid)[:16], 'big')}"


class UidPseudonyms:
    """Replaces Study / Series Instance UIDs in outputs by keyed pseudonyms (``uid_pseudonym``).

    The key is the stripped text of a key file (at least 16 characters; make one with
    ``python -c "import secrets; print(secrets.token_hex(32))" > uid.key``), kept by whoever links
    results back to the archive. It is never written or logged: outputs carry only its
    ``fingerprint``, so runs made with one key can be told apart from others and joined.

    Calling the object maps one value: a DICOM UID to its pseudonym, anything else (a relative path
    standing in for the UID of a NIfTI volume or an image) unchanged; a pseudonym it made is returned
    as it is, so mapping twice is harmless. ``study_id`` values, and values known to come from a
    DICOM header (``identifier``), are mapped whatever they look like: archives hold UIDs that are
    not UID-shaped (``1.2.840.99999.7.x42``).
    """

    UID_COLUMNS = ("series_uid",)
    ID_COLUMNS = ("study_id",)

    def __init__(self, key: bytes):
        self._key = key
        self._made: set[str] = set()

    def __repr__(self) -> str:  # never the key
        return f"UidPseudonyms(fingerprint={self.fingerprint!r})"

    @classmethod
    def from_key_file(cls, path: str | Path, flag: str = "--pseudonymize-uids") -> UidPseudonyms:
        """Read the key from ``path``; ``flag`` names the option in errors (which never quote the file)."""
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"{flag}: {path} is a folder, not a key file")
        if not path.is_file():
            raise MissingInputError(f"{flag}: key file not found: {path}")
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"{flag}: cannot read key file {path}: {exc.strerror}") from None
        if len(key) < MIN_KEY_CHARS:
            raise UsageError(f"{flag}: the key in {path} has {len(key)} characters, needs at least {MIN_KEY_CHARS} "
                             "(python -c \"import secrets; print(secrets.token_hex(32))\" > KEYFILE)")
        return cls(key)

    @property
    def fingerprint(self) -> str:
        """12 hex digits that identify the key (a keyed hash of a fixed text), not the key."""
        return keyed_digest(self._key, "lung-effnet uid key fingerprint").hex()[:12]

    def __call__(self, value: str) -> str:
        value = str(value or "")
        if value in self._made or not is_dicom_uid(value):
            return value
        return self._pseudonym(value)

    def identifier(self, value: str) -> str:
        """Any non-empty identifier (a study id from a manifest, a Study or Series Instance UID read from
        a DICOM header, whatever it looks like) as a UID pseudonym."""
        value = str(value or "").strip()
        return value if not value or value in self._made else self._pseudonym(value)

    def _pseudonym(self, value: str) -> str:
        made = uid_pseudonym(value, self._key)
        self._made.add(made)
        return made

    def apply(self, rows: Iterable[dict]) -> None:
        """Map the UID columns (``series_uid``; ``study_id``) of ``rows`` in place."""
        for row in rows:
            for column in self.UID_COLUMNS:
                if row.get(column):
                    row[column] = self(row[column])
            for column in self.ID_COLUMNS:
                if row.get(column):
                    row[column] = self.identifier(row[column])
