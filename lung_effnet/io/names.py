"""Names of output files made from series UIDs or relative paths, and paths as outputs show them."""

from __future__ import annotations

import hashlib
import os

STEM_CHARS = 80
"""Characters of the readable part of a made-up file name: with the hash and a suffix it stays far
below the 255 bytes a file name may have on common file systems, however long the path it names."""


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".dcm")


def strip_volume_suffix(key: str) -> str:
    """``key`` without a trailing ``.nii.gz``, ``.nii`` or ``.dcm`` (any case): the readable part of a
    name that gets its own suffix (``P0001_ct.nii.gz`` -> ``P0001_ct``)."""
    lower = key.lower()
    suffix = next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), "")
    return key[:len(key) - len(suffix)] if suffix and len(key) > len(suffix) else key


def safe_file_name(key: str, suffix: str = "", readable: str | None = None) -> str:
    """A file name for ``key`` (a series UID or a relative path) that no other key gets: the key with
    every character but ASCII letters, digits and ``._-`` made ``_`` (a longer one keeps its first 30
    and last 49 characters around a ``~``), then ``-`` and 12 hex digits of a hash of the whole key.
    ``a/b.jpg`` and ``a_b.jpg`` share a readable part but not a name; a 300-character path gives a
    name of 80 + 13 characters and the suffix. ``readable``: the text to make the readable part of
    instead of ``key`` (the hash is still of ``key``)."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in (key if readable is None else readable))
    if len(stem) > STEM_CHARS:
        stem = stem[:30] + "~" + stem[-(STEM_CHARS - 31):]
    digest = hashlib.blake2b(os.fsencode(key), digest_size=6).hexdigest()
    return f"{stem}-{digest}{suffix}"


def display_name(path: str) -> str:
    """A path as written to outputs: bytes of a file name that are not UTF-8 as backslash escapes
    (``\\xff``), and a backslash of the name itself doubled (``\\\\``), so that no two paths share a
    display name: a file whose name holds the byte 0xE9 shows as ``caf\\xe9.jpg``, one literally named
    so as ``caf\\\\xe9.jpg``."""
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
