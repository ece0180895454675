"""SIGHUP: a running server or worker reads its configuration again and applies what can
change live.

The configuration is read as at start (`corral.cli._common.settings_from`: the
environment, the env file over it, the command line's flags over both); an invalid one is
refused with a logged error and the running one kept. Of what changed, the settings in
`Reloader.live` take effect at once (the log level; an entry point may add its own); every
other change is logged as needing a restart and is not applied, so the process keeps
behaving as one configuration, never half of two.

Some settings name files whose contents change under the same name (a renewed TLS
certificate): those in `Reloader.reread` are read again on every reload, changed or not,
and what refuses them keeps their running values, the old files' contents included.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from corral import logs
from corral.config import Settings
from corral.errors import CorralError

log = logging.getLogger("corral.reload")


class Reloader:
    """The settings a process runs with, and how to read and apply new ones."""

    def __init__(self, running: Settings, load: Callable[[], Settings]) -> None:
        self.running = running
        self._load = load
        # Setting name -> what applies its new value in this process.
        self.live: dict[str, Callable[[Any], None]] = {"log_level": logs.set_level}
        # Setting names -> what reads their files again and serves them, given the running
        # settings with those names' new values; it raises CorralError to keep the old.
        self.reread: dict[tuple[str, ...], Callable[[Settings], None]] = {}

    def reload(self) -> bool:
        """Read the configuration and apply its live changes; False when it is refused."""
        try:
            new = self._load()
        except CorralError as exc:
            log.error(
                "configuration not reloaded: the running one is kept", extra={"error": str(exc)}
            )
            return False
        changed = {
            f.name: getattr(new, f.name)
            for f in fields(Settings)
            if getattr(new, f.name) != getattr(self.running, f.name)
        }
        for names, serve in self.reread.items():
            try:
                serve(replace(self.running, **{name: getattr(new, name) for name in names}))
            except CorralError as exc:
                log.error(
                    "files not reloaded: the running ones are kept",
                    extra={"settings": ", ".join(names), "error": str(exc)},
                )
                for name in names:
                    changed.pop(name, None)
        served = {name for names in self.reread for name in names}
        applied = {n: value for n, value in changed.items() if n in self.live or n in served}
        restart = sorted(name for name in changed if name not in applied)
        report = {
            "applied": ", ".join(f"{name}={value}" for name, value in applied.items()) or "-",
            "restart_needed": ", ".join(restart) or "-",
        }
        # Said at info, under whichever of the old and new log levels shows more: a level
        # raised past info still says so once, a lowered one shows the line too.
        lowers = _level(new.log_level) <= _level(self.running.log_level)
        if not lowers:
            log.info("configuration reloaded", extra=report)
        for name, value in applied.items():
            if name in self.live:
                self.live[name](value)
        self.running = replace(self.running, **applied)
        if lowers:
            log.info("configuration reloaded", extra=report)
        if restart:
            log.warning(
                "changed settings that take effect only at the next start: restart to apply",
                extra={"settings": ", ".join(restart)},
            )
        return True


def _level(name: str) -> int:
    return int(logging.getLevelName(name.upper()))


def hold_sighup() -> None:
    """Until the process installs its reload, a SIGHUP (`systemctl reload` right after a
    start) is logged and ignored rather than ending it. A handler, not SIG_IGN: an
    ignored signal would stay ignored in every program the process starts."""
    signal.signal(
        signal.SIGHUP,
        lambda sig, frame: log.warning("reload asked for while starting: ignored, send it again"),
    )
