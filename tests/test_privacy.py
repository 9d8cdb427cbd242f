from lung_effnet import privacy


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
