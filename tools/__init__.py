"""Command-line tools, one command each, run from the repository root: ``python -m tools.<name> --help``."""
