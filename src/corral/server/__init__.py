"""The API server: Connect (JSON and binary), gRPC-Web and, on pyvoy, native gRPC.

`create_app` builds the ASGI app; `serve` runs it in the foreground (`corral server`).
Both are imported on first use: under pyvoy the app is loaded in Envoy's process
(`corral.server.asgi`), and `corral server` itself, which only supervises Envoy there,
must not spend seconds loading it too.
"""

from typing import TYPE_CHECKING

from corral._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.server.app import CorralApp, create_app
    from corral.server.main import serve

__all__ = ["CorralApp", "create_app", "serve"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CorralApp": "corral.server.app",
        "create_app": "corral.server.app",
        "serve": "corral.server.main",
    },
    __all__,
)
