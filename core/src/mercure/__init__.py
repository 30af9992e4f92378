"""mercure: a plugin-based DICOM router that reads mercure's configuration unchanged.

Plugins import :data:`hookimpl` from here::

    from mercure import hookimpl

    @hookimpl
    def register_targets(register):
        register("xnat", XnatTargetConfig, XnatTarget)
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("mercure-core")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

PROJECT_NAME = "mercure"
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
