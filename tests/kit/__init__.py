"""The tests' kit: the helpers and fakes every test module shares.

Fixtures live in tests/conftest.py; what they and the tests build on lives here, one
concept a module: `polling` (wait until a condition holds), `http` (loopback HTTP
servers: the callback receiver and its misbehaving kin), `connect` (the API as raw Connect
JSON over httpx), `claimers` (threads racing for the store's job claims), `processes` (no
spawned process outlives its test), `internet` (a fake internet of network namespaces for
the network tests, with its hosts' servers in `fakehosts`), `oci_images` (OCI images built
by hand, and a loopback registry to push them to).
"""
