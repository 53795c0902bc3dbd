"""The wire contract shared by balancer and replica: block hashing, KV events, load reports.

Torch-free on purpose: the balancer installs without torch and imports only this package.
"""
