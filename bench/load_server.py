"""Load test of the team tracking server: N training-like clients logging per-step metrics.

    python bench/load_server.py                       # fresh stack in a temp dir, 8 clients
    python bench/load_server.py --clients 8 --steps 100 --metrics 5 --auth-cache-ttl 0
    python bench/load_server.py --state-dir .fowlflow/server   # an already running stack

Each client is its own process (as each training job is) with its own login and the retry
settings of ``fowlflow server env``: it creates a run,
then for every step sends one synchronous ``log_batch`` with ``--metrics`` values and times it.
All clients start together (a barrier). Afterwards the benchmark counts the rows in
PostgreSQL's ``metrics`` table for those runs and fails unless every value sent is there.

Prints a Markdown row for docs/benchmarks.md and writes the full result to
bench/results/load_server-<time>.json. Not a test: never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def client(idx: int, env: dict, experiment_id: str, steps: int, n_metrics: int, barrier,
           results) -> None:
    """One training-like process: a run, ``steps`` timed log_batch calls, end of run."""
    os.environ.update(env)
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = c.create_run(experiment_id, run_name=f"load-{idx}").info.run_id
    lat = []
    barrier.wait()
    t_start = time.time()
    for step in range(steps):
        now = int(time.time() * 1000)
        batch = [Metric(f"m{k}", float(step * k), now, step) for k in range(n_metrics)]
        t0 = time.perf_counter()
        c.log_batch(run_id, metrics=batch)
        lat.append(time.perf_counter() - t0)
    t_end = time.time()
    c.set_terminated(run_id)
    results.put({"client": idx, "run_id": run_id, "latencies": lat, "start": t_start,
                 "end": t_end})


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--metrics", type=int, default=5, help="metric values per log_batch")
    ap.add_argument("--workers", type=int, default=2, help="mlflow server workers (new stack)")
    ap.add_argument("--auth-cache-ttl", type=int, default=30,
                    help="basic-auth login cache seconds (new stack; 0 = off)")
    ap.add_argument("--state-dir", type=Path,
                    help="use the running stack of this state dir instead of a new one")
    args = ap.parse_args()

    from fowlflow.server import Stack, StackConfig
    from fowlflow.server.mlflow_server import CLIENT_RETRY_ENV
    from fowlflow.server.users import AuthAdmin

    own = args.state_dir is None
    state = Path(tempfile.mkdtemp(prefix="ffbench-", dir="/tmp")) if own else args.state_dir
    if own:
        os.chmod(state, 0o711)
    cfg = StackConfig.load(state, pick_free=own, workers=args.workers,
                           auth_cache_ttl_s=args.auth_cache_ttl)
    stack = Stack(cfg)
    try:
        if own:
            stack.start()
        admin = AuthAdmin(cfg.tracking_uri, stack.secrets.admin_username,
                          stack.secrets.admin_password)
        env = stack.client_env()
        os.environ.update(env)
        from mlflow import MlflowClient

        exp_id = MlflowClient(cfg.tracking_uri).create_experiment(f"load-{int(time.time())}")
        # A user per client, as a team would have; each gets EDIT on the experiment.
        envs = []
        for i in range(args.clients):
            user, pw = f"loaduser{i}-{exp_id}", os.urandom(12).hex()
            admin.create_user(user, pw)
            admin.grant(user, "experiment", exp_id, "EDIT")
            envs.append({**stack.client_env(user, pw), **CLIENT_RETRY_ENV})

        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(args.clients + 1), ctx.Queue()
        procs = [ctx.Process(target=client, args=(i, envs[i], exp_id, args.steps, args.metrics,
                                                  barrier, results))
                 for i in range(args.clients)]
        for p in procs:
            p.start()
        barrier.wait()  # every client has its run; go
        t0 = time.time()
        out = [results.get(timeout=3600) for _ in procs]
        wall = time.time() - t0
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a client failed: exit codes {[p.exitcode for p in procs]}")

        run_ids = [r["run_id"] for r in out]
        with stack.postgres.connect() as conn:
            stored = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)",
                                  (run_ids,)).fetchone()[0]
        sent = args.clients * args.steps * args.metrics
        lat = [x for r in out for x in r["latencies"]]
        result = {
            "clients": args.clients, "steps": args.steps, "metrics_per_batch": args.metrics,
            "server_workers": cfg.workers, "auth_cache_ttl_s": cfg.auth_cache_ttl_s,
            "requests": len(lat), "metric_values_sent": sent, "metric_rows_in_postgres": stored,
            "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 1),
            "metric_values_per_s": round(sent / wall, 1),
            "log_batch_p50_ms": round(statistics.median(lat) * 1000, 1),
            "log_batch_p95_ms": round(percentile(lat, 0.95) * 1000, 1),
            "log_batch_p99_ms": round(percentile(lat, 0.99) * 1000, 1),
            "log_batch_max_ms": round(max(lat) * 1000, 1),
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}",
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
        }
        outdir = ROOT / "bench" / "results"
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / f"load_server-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(
            json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        print(f"| {args.clients} | {args.steps} x {args.metrics} | {cfg.workers} | "
              f"{cfg.auth_cache_ttl_s} s | {result['requests_per_s']} | "
              f"{result['metric_values_per_s']} | {result['log_batch_p50_ms']} | "
              f"{result['log_batch_p95_ms']} | {stored}/{sent} |")
        if stored != sent:
            print(f"FAIL: {sent} metric values sent, {stored} in PostgreSQL", file=sys.stderr)
            return 1
        return 0
    finally:
        if own:
            stack.stop()
            import shutil

            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
