"""fowlflow.trainer."""
