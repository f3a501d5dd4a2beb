"""8 training-like clients ride out an outage of the tracking server.

The clients use exactly what ``fowlflow server env`` exports (MLflow's retry variables; see
docs/deployment.md, "Retries"). The mlflow server is stopped for ``OUTAGE_S`` while every
client is mid-run, then started again; every client must finish with exit code 0 and every
metric value of every step must be in PostgreSQL once (0 lost, 0 failed). Without those
exports the clients fall back to the tests' quick-failing settings (3 retries, ~6 s) and fail.

The server is down for 30 s, and then takes some seconds to start: a request fails at 0, 2, 6,
14 and 30 s into the outage, and the retry at 62 s (after the 32 s wait) finds the server back,
so the clients go through five failed retries, ten times what the tests' quick-failing settings
ride out, and all finish about a minute after the outage began (at 126 s, the next retry, if the
server takes long to come back). How long an outage the exported settings ride out at most
(docs/deployment.md promises 5 minutes; it is about 8) is checked from the retry policy
MLflow builds from them, not by waiting that long (an outage of 90 s, waited out here before,
only took the clients through one more retry and cost the suite a minute).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

from tests.server.conftest import fowlflow
from tests.server.test_faults import Client, _metric_counts, _run_status

OUTAGE_S = 30  # the server comes back before the clients' retry at 62 s (see above)
PROMISED_S = 300  # docs/deployment.md: an outage of up to 5 minutes is ridden out
CLIENTS = 8
STEPS = 30


def _server_env(stack) -> dict[str, str]:
    """The variables ``eval "$(fowlflow server env)"`` sets, read from a real shell."""
    out = fowlflow("server", "env", "--state-dir", str(stack.cfg.state_dir)).stdout
    proc = subprocess.run(["bash", "-c", out + "\nenv -0"], capture_output=True, check=True,
                          env={"PATH": "/usr/bin:/bin"})
    pairs = (item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("MLFLOW_")}


def _longest_outage_ridden_out(env: dict[str, str]) -> float:
    """Seconds a request retries for with ``env``'s settings: the sum of the waits before each
    of its retries, from the urllib3 ``Retry`` that MLflow's HTTP session is built with
    (without the random jitter, which only adds)."""
    from mlflow.utils.request_utils import _get_request_session
    from urllib3.util.retry import RequestHistory

    session = _get_request_session(int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]),
                                   float(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]), 0.0,
                                   (503,), True, True)
    retry = session.get_adapter("http://").max_retries
    failed = RequestHistory("POST", "/", OSError("refused"), None, None)
    return sum(retry.new(history=(failed,) * n).get_backoff_time()
               for n in range(1, retry.total + 1))


def test_exported_retries_ride_out_the_promised_outage(stack):
    env = _server_env(stack)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        assert name in env, f"`fowlflow server env` does not export {name}"
    # 0, 2, 4, 8, 16, 32, 64, 120, 120, 120 s: retried for 486 s after the first failure.
    assert _longest_outage_ridden_out(env) >= PROMISED_S + 60
    # MLflow's own defaults (7 retries, factor 2: 0, 4, 8, ..., 120 s) fall short of it.
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
                                              MLFLOW_HTTP_REQUEST_MAX_RETRIES)

    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": MLFLOW_HTTP_REQUEST_MAX_RETRIES.default,
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.default}
    assert _longest_outage_ridden_out(defaults) < PROMISED_S


def test_eight_clients_ride_out_an_outage(stack):
    env = _server_env(stack)
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        clients = list(pool.map(
            lambda i: Client(stack, "outage", str(STEPS), "--interval", "0.5", extra_env=env),
            range(CLIENTS)))
    try:
        for c in clients:
            c.wait_for("STEP 2")
        t0 = time.monotonic()
        stack.stop_component("mlflow")
        # Every client is mid-run: the outage hits all 8.
        done_before = [sum(line.startswith("STEP ") for line in c.stdout) for c in clients]
        assert max(done_before) < STEPS, done_before
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))  # the outage itself
        stack.start_component("mlflow")
        outage = time.monotonic() - t0
        results = [c.finish(timeout=600) for c in clients]
        waited = time.monotonic() - t0
    finally:
        for c in clients:
            c.kill()
    failed = [(c.run_id, err[-1500:]) for c, (code, err) in zip(clients, results) if code != 0]
    assert not failed, failed
    assert outage >= OUTAGE_S
    for c in clients:
        assert len([line for line in c.stdout if line.startswith("STEP ")]) == STEPS
        assert _metric_counts(stack, c.run_id) == {"loss": STEPS, "acc": STEPS}
        assert _run_status(stack, c.run_id) == "FINISHED"
    print(f"{CLIENTS} clients (steps done before the outage: {done_before}): outage "
          f"{outage:.0f} s, all finished {waited:.0f} s after it began; "
          f"{CLIENTS * STEPS * 2} metric values, 0 lost, 0 failed")
