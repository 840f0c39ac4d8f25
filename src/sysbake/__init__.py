"""sysbake: bake OCI system-container images that boot systemd as PID 1."""

from sysbake.errors import SysbakeError

# The one place the version is written: pyproject.toml reads it (setuptools, dynamic).
__version__ = "0.1.0"
__all__ = ["SysbakeError", "__version__"]
