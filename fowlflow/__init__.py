"""fowlflow: train, track and register PyTorch image classifiers with MLflow.

    mlflow run . --env-manager local -P data=path/to/imagefolder -P num_epochs=5

``python -m fowlflow.train`` (the MLproject's main entry point) runs ``trainer`` (the payload),
then ``registry`` (versions, ONNX, aliases, serving); both log through ``tracking`` and read
images through ``data``. ``projects`` holds the launch backends, ``server`` the team tracking
server, ``cli`` the ``fowlflow`` command. docs/architecture.md shows which imports which.
"""

__version__ = "0.1.0"
