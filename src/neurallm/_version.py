"""The package version, in a leaf module: anything may import it without importing the package's ``__init__``
(whose lazy names point up to every layer)."""

__version__ = "0.1.0"
