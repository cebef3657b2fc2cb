"""The package version, alone in a stdlib-only module: `reparam --version` reads it without importing torch."""

__version__ = "0.1.0"
