"""Reading and writing CT, below any stage: DICOM series, NIfTI volumes, 2D images, geometry, atomic writes.

In: files on disk (DICOM of any transfer syntax pydicom can decode, ``.nii``/``.nii.gz``, PNG/JPG/BMP/TIFF).
Out: arrays in memory (``volume.Volume``: ``(Z, Y, X)`` Hounsfield units with an LPS affine in mm; one
``(H, W)`` plane per sample from ``planes.read_sample_plane``) and, on disk, only what other stages ask for:
CSV files written atomically (``ledger.write_csv``) and the ledger of every file seen and why it was used or
skipped (cells a spreadsheet would run as formulas quoted). ``privacy`` turns patient identifiers, and on
request Study / Series Instance UIDs, into keyed pseudonyms before anything is written.
"""
