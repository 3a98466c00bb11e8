"""The node runtime: every node program of every pattern runs under it.

Start a node with ``python3 -m sandboxes.runtime.run <pattern_id> <program>``; talk to a
running node with ``python3 -m sandboxes.runtime.ctl '<json>'``. Programs use the API in
``sandboxes.runtime.node``. The contract with the engines is in ``sandboxes/README.md``;
the telemetry schema in ``TELEMETRY.md``.

This package imports nothing heavy, so the control client starts fast.
"""
