"""What a training run sends to MLflow goes through here; it is a no-op off global rank 0.

    tracker = RunTracker(enabled=ctx.is_main)
    run_id = tracker.start()                  # joins MLFLOW_RUN_ID when `mlflow run` set it
    tracker.log_params(cfg.as_params())
    tracker.log_epoch({"val_acc": 0.9}, epoch=1)
    tracker.log_steps(0, [0.7, 0.6], images_per_sec=30.0)  # async: never blocks a step
    tracker.finish("FINISHED")

Per-step values are queued with MLflow's async logging while the epoch runs (the loop hands
them over at most every ~10 s, see :mod:`fowlflow.trainer.loop`); epoch metrics are one
``log_batch`` each. System metrics (CPU, memory; GPU through nvidia-ml-py)
come from MLflow's own monitor: node 0's (global rank 0's) under MLflow's own names
(``system/cpu_utilization_percentage``) whatever the backend, so one machine's metrics have one
name; on a multi-node run the local rank 0 of node k >= 1 adds its own under
``system/node<k>/...`` (:func:`start_node_system_metrics`).

The rest of fowlflow calls MLflow itself where the call is its job: the registry registers,
tags and aliases model versions and logs the ONNX model (``fowlflow.registry``), the launch
backends create and end the runs they submit (``fowlflow.projects``). The training and
registry entry points log their params by this package's one rule
(:func:`fowlflow.tracking.run_tracker.log_new_params`).
"""

from fowlflow.tracking.run_tracker import RunTracker, start_node_system_metrics

__all__ = ["RunTracker", "start_node_system_metrics"]
