"""Pseudonymisation: patient identifiers leave this package only as keyed hashes.

A plain hash of a PatientID can be reversed by hashing candidate IDs (hospital IDs are short);
a keyed hash (HMAC-SHA256) cannot without the key. The key comes from ``LUNG_EFFNET_HASH_KEY``
or, failing that, from a key file created once (mode 0600) at ``~/.config/lung-effnet/hash.key``
(``LUNG_EFFNET_KEY_FILE`` overrides the location). Keep the key to get the same pseudonyms across
runs; anyone holding it and the raw IDs can re-link pseudonyms, so keep it out of shared outputs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

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
    digest = hmac.new(hash_key(), identifier.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:16]}"
