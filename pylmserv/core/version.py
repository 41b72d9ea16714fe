"""The package version (core, so every layer can name it in a User-Agent)."""
__version__ = "0.1.0"
