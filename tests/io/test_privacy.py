import multiprocessing
import os

from lung_effnet.io import privacy


def test_pseudonym_is_keyed_stable_and_not_the_id(monkeypatch):
    monkeypatch.setenv("LUNG_EFFNET_HASH_KEY", "key-one")
    a = privacy.pseudonym("12345678")
    assert a == privacy.pseudonym("12345678")
    assert a.startswith("P-") and len(a) == 18 and "12345678" not in a
    assert privacy.pseudonym("12345679") != a
    monkeypatch.setenv("LUNG_EFFNET_HASH_KEY", "key-two")
    assert privacy.pseudonym("12345678") != a  # another key, another pseudonym
    assert privacy.pseudonym("") == ""


def test_key_file_is_created_private_and_reused(monkeypatch, tmp_path):
    monkeypatch.delenv("LUNG_EFFNET_HASH_KEY", raising=False)
    key_file = tmp_path / "sub" / "hash.key"
    monkeypatch.setenv("LUNG_EFFNET_KEY_FILE", str(key_file))
    first = privacy.pseudonym("PAT-1")
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    assert privacy.pseudonym("PAT-1") == first


def _key_in_a_new_process(key_file: str, start) -> str:
    os.environ.pop("LUNG_EFFNET_HASH_KEY", None)
    os.environ["LUNG_EFFNET_KEY_FILE"] = key_file
    start.wait()  # all processes reach for the missing key file at once
    return privacy.hash_key().decode()


def test_processes_that_create_the_key_at_once_all_get_the_same_key(tmp_path):
    """Scoring's header workers may be the first to need the key: none may read a half-written
    file or fail on another's, and all must hash with one key."""
    key_file = str(tmp_path / "hash.key")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            keys = pool.starmap(_key_in_a_new_process, [(key_file, start)] * 4)
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert open(key_file).read().strip() == keys[0]
    assert [p.name for p in tmp_path.iterdir()] == ["hash.key"]  # no temporary file left behind


def test_uid_pseudonym_is_a_keyed_valid_dicom_uid():
    """``2.25.`` + the first 16 bytes of HMAC-SHA256(key, uid) in decimal: a valid UID (digits, no
    leading zero, at most 64 characters), the same for one key, another for another key."""
    import hashlib
    import hmac
    import re

    uid = "1.2.840.113619.2.55.3.604688119.971.1171312521.123"
    a = privacy.uid_pseudonym(uid, b"key-one-0123456789")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", a) and len(a) <= 64 and int(a[5:]) < 2**128
    assert a == f"2.25.{int.from_bytes(hmac.new(b'key-one-0123456789', uid.encode(), hashlib.sha256).digest()[:16], 'big')}"
    assert privacy.uid_pseudonym(uid, b"key-one-0123456789") == a
    assert privacy.uid_pseudonym(uid, b"key-two-0123456789") != a
    assert privacy.uid_pseudonym(uid + "1", b"key-one-0123456789") != a


def test_uid_pseudonyms_map_uids_only_once_and_never_show_the_key(tmp_path):
    key_file = tmp_path / "uid.key"
    key_file.write_text("a-secret-key-of-some-length\n")
    uids = privacy.UidPseudonyms.from_key_file(key_file)
    assert uids("1.2.3.4") == privacy.uid_pseudonym("1.2.3.4", b"a-secret-key-of-some-length")  # newline stripped
    assert uids(uids("1.2.3.4")) == uids("1.2.3.4")  # mapping twice is harmless
    assert uids("vol/ct.nii.gz") == "vol/ct.nii.gz" and uids("") == ""  # a path standing in for a UID stays
    assert uids.identifier("STUDY-17").startswith("2.25.")  # study ids are mapped whatever they look like
    rows = [{"series_uid": "1.2.3.4", "study_id": "1.2.3", "path": "1.2.3.4/a.dcm"}]
    uids.apply(rows)
    assert rows[0]["path"] == "1.2.3.4/a.dcm" and rows[0]["series_uid"] == uids("1.2.3.4")
    assert rows[0]["study_id"] == uids("1.2.3")
    assert "secret" not in repr(uids) and "secret" not in uids.fingerprint
    other = tmp_path / "other.key"
    other.write_text("another-secret-key-0123")
    assert privacy.UidPseudonyms.from_key_file(other).fingerprint != uids.fingerprint


def test_patient_pseudonyms_did_not_change():
    """The UID pseudonyms share the keyed hash with the patient pseudonyms; the latter are unchanged."""
    import hashlib
    import hmac

    expected = hmac.new(privacy.hash_key(), b"12345678", hashlib.sha256).hexdigest()[:16]
    assert privacy.pseudonym("12345678") == f"P-{expected}"


def test_uid_like_names_warn_whatever_their_extension(caplog):
    """A file named after a UID carries it whatever its extension (any case); a UID contains dots,
    so only a known extension is removed before the comparison."""
    import logging

    uid = "1.2.840.113619.2.55.3"
    for name in (uid, f"{uid}.dcm", f"{uid}.DCM", f"{uid}.nii.gz", f"{uid}.NII.GZ", f"{uid}.nii", f"{uid}.png",
                 f"{uid}.Jpeg", f"{uid}.tiff", f"{uid}.IMA", f"{uid}.dicom", f"{uid}.bmp"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=privacy.__name__):
            privacy.warn_uid_like_paths([f"patient/{name}"])
        assert "look like DICOM UIDs" in caplog.text, name
    assert privacy.is_uid_like_name(uid) and privacy.is_uid_like_name(f"{uid}.Nii.Gz")
    for name in ("ct.nii.gz", "IM-0001-0001.dcm", "1.2.840.x.dcm", f"{uid}.txt", f"{uid}.nii.gz.bak", "scan.png", ".dcm"):
        assert not privacy.is_uid_like_name(name), name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=privacy.__name__):
        privacy.warn_uid_like_paths(["patient/ct.nii.gz", "a/IM-0001.DCM"])
    assert "look like DICOM UIDs" not in caplog.text


def test_a_folder_given_as_key_file_says_so(tmp_path):
    import pytest

    from lung_effnet.errors import UsageError

    with pytest.raises(UsageError, match="is a folder, not a key file"):
        privacy.UidPseudonyms.from_key_file(tmp_path)


def test_identifier_maps_dicom_uids_that_are_not_uid_shaped():
    uids = privacy.UidPseudonyms(b"0123456789abcdef-key")
    odd = "1.2.840.99999.7.x42"
    assert uids(odd) == odd  # a relative path or an odd value, conditional path: as found
    made = uids.identifier(odd)
    assert made != odd and made.startswith("2.25.") and uids.identifier(made) == made and uids(made) == made
