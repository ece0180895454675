"""`hybridmethod`: one name that works on an instance and on the class, as E2B's SDK has it.

E2B users write both `sbx.kill()` and `Sandbox.kill(sandbox_id)`; a plain method called
on the class would take the id for `self` and fail far from the mistake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=Callable[..., Any])


class hybridmethod(Generic[P, R, C]):
    """`on_instance` bound when reached through an instance, `on_class` through the class."""

    def __init__(self, on_instance: Callable[Concatenate[Any, P], R], on_class: C) -> None:
        self._on_instance = on_instance
        self._on_class = on_class
        self.__doc__ = on_instance.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> C: ...

    @overload
    def __get__(self, obj: object, owner: type[Any] | None = None) -> Callable[P, R]: ...

    def __get__(self, obj: object, owner: type[Any] | None = None) -> C | Callable[P, R]:
        if obj is None:
            return self._on_class
        return functools.partial(self._on_instance, obj)
