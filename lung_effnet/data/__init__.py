"""CT data layer: readers, manifests, synthetic phantoms, and the ingest stage."""
