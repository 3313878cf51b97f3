"""The package version, in a leaf module, so the controls (the audit tracer's scope version)
can name it without importing the package's top-level API.

>>> from stepguard._private.version import VERSION
>>> import stepguard
>>> VERSION == stepguard.__version__
True
"""

VERSION = "0.1.0"
