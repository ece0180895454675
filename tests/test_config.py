"""Settings from the environment, and the public names of each package."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import CorralError, InvalidRequest


def test_settings_read_the_corral_environment() -> None:
    settings = Settings.from_env(
        {
            "CORRAL_RUNTIME_DIR": "/x/run",
            "CORRAL_UID_SLOTS": "10",
            "CORRAL_ALLOW_PROCESS_BACKEND": "1",
        }
    )
    assert settings.runtime_dir == Path("/x/run")
    assert settings.uid_slots == 10
    assert settings.allow_process_backend is True


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CORRAL_UID_SLOTS", "many", "not an integer"),
        ("CORRAL_UID_SLOTS", "40000", "passes the largest uid"),
        ("CORRAL_ALLOW_PROCESS_BACKEND", "maybe", "1 or 0"),
    ],
)
def test_bad_settings_say_what_to_use(var: str, value: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Settings.from_env({var: value})


@pytest.mark.parametrize("module", ["corral.isolation", "corral.guest"])
def test_public_names_are_exactly_all(module: str) -> None:
    mod = importlib.import_module(module)
    public = {name for name in vars(mod) if not name.startswith("_")}
    submodules = {n for n in public if type(getattr(mod, n)).__name__ == "module"}
    assert set(mod.__all__) == public - submodules - {"annotations", "Path"}
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_every_error_shares_the_root_and_has_a_message() -> None:
    import corral.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    for cls in classes:
        assert issubclass(cls, CorralError)
        assert str(cls()), cls
