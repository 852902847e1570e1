"""The package version (one place: the package, its Hub folders and run metrics read it)."""

__version__ = "0.1.0"
