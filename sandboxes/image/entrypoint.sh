#!/bin/sh
# Entry point of every node container: runs the node's command ("$@", by default
# `python3 -m sandboxes.runtime.run <pattern_id> <program>`) in place of this shell.
#
# First it makes the node's own process the one the kernel's OOM killer picks first
# (oom_score_adj 1000: raising it needs no privilege). A memory bomb anywhere in the
# container, even a process started with `docker exec`, then takes the node down whole,
# and Docker records the exit as OOMKilled, instead of the kernel quietly killing the
# bomb and nobody knowing. On the host, sandbox nodes are likewise the first to go under
# memory pressure, before the platform and its database.
echo 1000 >/proc/self/oom_score_adj 2>/dev/null || true
exec "$@"
