"""Names of output files made from series UIDs or relative paths, and paths as outputs show them."""

from __future__ import annotations

import hashlib
import os

STEM_CHARS = 80
"""Characters of the readable part of a made-up file name: with the hash and a suffix it stays far
below the 255 bytes a file name may have on common file systems, however long the path it names."""


def safe_file_name(key: str, suffix: str = "") -> str:
    """A file name for ``key`` (a series UID or a relative path) that no other key gets: the key with
    every character but ASCII letters, digits and ``._-`` made ``_`` (a longer one keeps its first 30
    and last 49 characters around a ``~``), then ``-`` and 12 hex digits of a hash of the whole key.
    ``a/b.jpg`` and ``a_b.jpg`` share a readable part but not a name; a 300-character path gives a
    name of 80 + 13 characters and the suffix."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in key)
    if len(stem) > STEM_CHARS:
        stem = stem[:30] + "~" + stem[-(STEM_CHARS - 31):]
    digest = hashlib.blake2b(os.fsencode(key), digest_size=6).hexdigest()
    return f"{stem}-{digest}{suffix}"


def display_name(path: str) -> str:
    """A path as written to outputs: bytes of a file name that are not UTF-8 as backslash escapes (``\\xff``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
