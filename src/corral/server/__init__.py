"""The API server: Connect (JSON and binary) over HTTP/1.1 on uvicorn.

`create_app` builds the ASGI app; `serve` runs it in the foreground (`corral server`).
"""

from corral.server.app import CorralApp, create_app
from corral.server.main import serve

__all__ = ["CorralApp", "create_app", "serve"]
