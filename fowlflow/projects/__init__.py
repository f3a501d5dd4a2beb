"""MLflow project backends: ``torchrun`` (this machine's GPUs) and ``ssh`` (remote hosts).

MLflow finds them through the ``mlflow.project_backend`` entry points in pyproject.toml::

    mlflow run . -b torchrun -c '{"process_count_per_node": "all"}'
    mlflow run . -b ssh -c '{"hosts": ["gpu-box"]}'
    fowlflow attach RUN_ID | fowlflow cancel RUN_ID

A backend = parse config (:mod:`.config`) -> runner (:mod:`.runners`) -> supervisor
(:mod:`.supervise`) -> ``SubmittedRun`` (:mod:`.submitted`); one module per backend
(:mod:`.torchrun`, :mod:`.ssh`). This package only launches processes: importing it must not
import torch or boto3, because MLflow loads backends at start-up.
"""
