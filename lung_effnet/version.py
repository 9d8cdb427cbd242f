"""The package version, recorded in every run's outputs and MLflow tags."""

__version__ = "0.2.0.dev0"
