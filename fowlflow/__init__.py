"""fowlflow: train, track and register PyTorch image classifiers with MLflow.

    mlflow run . --env-manager local -P data=path/to/imagefolder -P num_epochs=5

Sub-packages: ``trainer`` (the payload), ``tracking`` (everything sent to MLflow),
``registry`` (versions, ONNX, aliases, serving) and ``projects`` (launch backends).
"""

__version__ = "0.1.0"
