"""The network of a sandbox: the policy (what it may reach), the addresses no policy
reaches by default, and the events that record each decision.

Everything here is pure: the kernel plumbing that enforces a policy lives with the
isolation tiers, which all receive the same `NetworkPolicy`.
"""
