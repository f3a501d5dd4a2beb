"""The team tracking server: PostgreSQL + SeaweedFS S3 + ``mlflow server`` with basic-auth.

From a shell::

    fowlflow server start                 # first start: initdb, bucket, admin user; ~20 s
    eval "$(fowlflow server env)"         # MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD
    mlflow run . --env-manager local -P data=...   # tracked on the team server
    fowlflow server status | stop

From Python (tests, benchmarks)::

    from fowlflow.server import Stack, StackConfig
    stack = Stack(StackConfig.load(state_dir, pick_free=True))
    stack.start(); ...; stack.stop()

Modules: ``config`` (state dir, ports, secrets), ``postgres``, ``seaweedfs``,
``mlflow_server`` (one server each), ``stack`` (all three), ``users`` (accounts and
permissions), ``auth_hook`` (the server's login check: throttling, the read-only role, run
attribution), ``commands`` (the CLI), ``procs`` (pids, ports, readiness), ``logpipe``
(rotated, capped server logs).
"""

from fowlflow.server.config import Secrets, StackConfig, default_state_dir
from fowlflow.server.stack import Stack

__all__ = ["Secrets", "Stack", "StackConfig", "default_state_dir"]
