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
