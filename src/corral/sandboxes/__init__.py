"""Teams' sandboxes as a service: lifecycle, quotas, timeouts, warm pool, metrics.

`SandboxManager` sits between the API server and the engine (`corral.isolation`); the
store (`corral.store`) keeps every state change, so a restarted server knows what
became of the sandboxes its predecessor ran.
"""

from corral.sandboxes.manager import SandboxManager
from corral.sandboxes.options import CreateOptions, SandboxRecord
from corral.store import MetricPoint

__all__ = ["CreateOptions", "MetricPoint", "SandboxManager", "SandboxRecord"]
