"""fowlflow.registry."""
