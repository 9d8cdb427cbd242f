"""Synthetic chest-CT phantoms for the demo and the tests (no patient data, no download).

In: a seed and sizes. Out on disk: a labelled archive in one of the source formats the pipeline reads
(DICOM series, optionally compressed, with localizers and SR documents; NIfTI volumes; IQ-OTH/NCCD-style
2D folders), ``labels.csv``, lesion masks and ``synthetic.json`` (what was drawn). Lesion sizes follow the
literature (sources in ``phantom``).
"""
