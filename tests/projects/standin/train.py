"""Stand-in trainer for the backend tests: all-reduce each step, rank 0 logs to MLflow."""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--sleep", type=float, default=0.2)
parser.add_argument("--fail_at", type=int, default=-1)
args = parser.parse_args()

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
client = None
if rank == 0:
    import mlflow

    client = mlflow.MlflowClient()
    run_id = os.environ["MLFLOW_RUN_ID"]
    client.log_param(run_id, "world_size", world)
    client.set_tag(run_id, "standin.pid", str(os.getpid()))
print(f"rank {rank}/{world} pid {os.getpid()} group_rank {os.environ.get('GROUP_RANK')}",
      flush=True)
for step in range(args.steps):
    t = torch.ones(1) * (rank + 1)
    if world > 1:
        dist.all_reduce(t)
    if step == args.fail_at and rank == 0:  # as the trainer fails: an error tag and line
        if client is not None:
            client.set_tag(run_id, "error", f"failing on purpose at step {step}")
        print(f"fowlflow: error: failing on purpose at step {step}", flush=True)
        sys.exit(3)
    if client is not None:
        client.log_metric(run_id, "allreduce_sum", float(t.item()), step=step)
    print(f"rank {rank} step {step} sum {t.item():.0f}", flush=True)
    time.sleep(args.sleep)
if world > 1:
    dist.destroy_process_group()
print(f"rank {rank} done", flush=True)
