"""The payload: data sources -> in-memory image caches -> model -> train/eval loop (DDP-ready).

    python -m fowlflow.trainer --data ../hymenoptera_data --num_epochs 5
"""
