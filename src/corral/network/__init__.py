"""The network of a sandbox: the policy (what it may reach), the addresses no policy
reaches by default, and the events that record each decision.

`policy`, `addresses` and `events` are pure values, shared by the SDK, the services and
every isolation tier. The host-side helpers that enforce a policy and observe traffic
(the ruleset, the per-sandbox resolver, the kernel log reader) live here too, apart from
any one tier, because gVisor and microVM sandboxes are put behind the same network
namespace and rules as the namespace tier's.
"""
