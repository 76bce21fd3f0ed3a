"""Whole jobs that compose the stages, and the `ldm` command line (the top layer: it may import every package)."""
