"""The ingest stage: a source (folders of 2D slices, a DICOM tree, NIfTI volumes, a manifest) -> manifest.

In: the user's source and, optionally, a labels table. Out on disk: ``manifest.csv`` (one row per sample:
path, pseudonymous patient id, label, series, slice index, optional lesion mask) and ``ledger.csv`` (every
file found, used or skipped with a reason). No identifier leaves this stage except as a keyed pseudonym.
"""
