"""The package version (its own module so that everything can import it without a cycle)."""

__version__ = "0.1.0"
