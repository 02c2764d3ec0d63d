"""The benchmark of vcpusched: a simulated host, named workloads, baseline policies.

Kept apart from the agent's package: the daemon never imports it (`vcpusched bench` does).
"""
