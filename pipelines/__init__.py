"""Thin end-to-end stages that compose the library; each is also a ``lung-effnet`` command."""
