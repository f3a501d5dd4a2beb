"""The payload: images (cached in memory or streamed, one part per DDP rank) -> model ->
train/eval loop (DDP-ready), tracked; data paths: docs/trainer.md.

    summary = run(parse_args(["--data", "synthetic", "--num_epochs", "2"]))  # trainer.train

Data sources and the shared image preprocessing are :mod:`fowlflow.data`; the command line
(``python -m fowlflow.train``, which also registers the model) is :mod:`fowlflow.train`.
The trainer never imports the registry.
"""
