"""Public names imported on first use (PEP 562), for packages whose import must stay light.

`import corral` must not load the SDK (the engine and the server import `corral.config`),
and `corral.client` must not load asyncio and the RPC runtime for the CLI's light paths;
both packages declare where each public name lives and get their module `__getattr__` and
`__dir__` from here.
"""

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: a name in `where` is imported from the
    module it maps to on first use, then kept in the package (the next lookup is plain)."""
    namespace = vars(sys.modules[package])
    names = sorted(public)

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(where[name]), name)
        return value

    def __dir__() -> list[str]:
        return list(names)

    return __getattr__, __dir__
