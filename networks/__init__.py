"""Neural networks of the project."""
