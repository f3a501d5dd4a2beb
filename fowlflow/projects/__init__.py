"""fowlflow.projects."""
