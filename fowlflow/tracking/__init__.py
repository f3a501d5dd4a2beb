"""fowlflow.tracking."""
