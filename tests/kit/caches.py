"""`python -m tests.kit.caches`: the shared Debian bases the suite uses, built before pytest.

A first bootstrap (a fresh clone's .cache) takes 20-60 s on 2 idle cores and minutes on a
loaded machine; inside a test it runs under that test's 120 s timeout, which kills it half
way (and the next test starts it over), and under pytest-xdist a second worker waits on its
lock inside a test of its own. Built here first, every test finds them cached. Where the
host cannot build them (no root, no archive) this says why and the tests skip as before.
"""

from __future__ import annotations

from tests.conftest import unmet
from tests.kit import debian, e2b_base


def main() -> None:
    if reason := unmet(debian.needs_archive("python3")):
        print(f"no cached Debian bases: {reason}")
        return
    print(f"Debian base with python3: {debian.base_tar(('python3',))}")
    if reason := unmet(e2b_base.needs_base()):
        print(f"no cached e2b base: {reason}")
        return
    print(f"e2b base: {e2b_base.base_layer().digest}")


if __name__ == "__main__":
    main()
