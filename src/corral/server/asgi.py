"""The app as a server process loads it by name: `corral.server.asgi:app`.

pyvoy runs the app inside Envoy's process, which imports it; `corral server` passes its
settings there as CORRAL_* variables (`Settings.to_env`), so this module reads only those.
"""

from __future__ import annotations

import json
import os

from corral import logs
from corral.config import Settings
from corral.server.app import CorralApp
from corral.server.envoy import INHERITED


def _restore_environment() -> None:
    """Put back the variables pyvoy changed for Envoy (`corral.server.envoy`)."""
    inherited = os.environ.pop(INHERITED, None)
    if inherited is None:  # not started by `corral server`
        return
    for name, value in json.loads(inherited).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


_restore_environment()
_settings = Settings.from_env()
logs.configure(_settings.log_level)
app = CorralApp(_settings)
