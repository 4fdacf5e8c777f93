"""The package version, in one place: the package root, file metadata and setup.cfg read it."""
__version__ = "0.1.0"
