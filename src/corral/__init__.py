"""Corral: isolated sandboxes for untrusted code, jobs and agents."""
