"""MLflow project backends: ``torchrun`` (this machine's GPUs) and ``ssh`` (remote hosts).

MLflow finds them through the ``mlflow.project_backend`` entry points in pyproject.toml::

    mlflow run . -b torchrun -c '{"process_count_per_node": "all"}'
    mlflow run . -b ssh -c '{"hosts": ["gpu-box"]}'
    fowlflow attach RUN_ID | fowlflow cancel RUN_ID
    fowlflow ls | fowlflow gc --yes     # launched runs; ended runs' folders removed

A backend parses its config (:mod:`.config`), creates the MLflow run (:mod:`.run_lifecycle`),
starts each node's command under the supervisor (:mod:`.supervise`, the program on the host;
:mod:`.nodes`, the client side) through a runner (:mod:`.runners`: this machine, or a host over
SSH with shared connections, :mod:`.ssh_connections`), saves the launch record
(:mod:`.launch_record`) and returns a ``SubmittedRun`` (:mod:`.submitted`, streaming in
:mod:`.log_stream`). One module per backend (:mod:`.torchrun`, :mod:`.ssh`); the ssh launch on
known hosts is :mod:`.ssh_launch` (with :mod:`.shipping`, :mod:`.envs`, :mod:`.tunnels`,
:mod:`.node_network`: a rendezvous port and the interface per node), for any backend that
brings its own hosts; a run that did not finish is reported by :mod:`.failure_summary`. This
package only launches processes: importing it must not import torch or boto3, because MLflow
loads backends at start-up.
"""
