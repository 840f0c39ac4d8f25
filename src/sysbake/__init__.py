"""sysbake: bake OCI system-container images that boot systemd as PID 1."""

from sysbake.errors import SysbakeError

__version__ = "0.1.0"
__all__ = ["SysbakeError", "__version__"]
