"""eps: Explicit Pseudo-pixel Supervision (CVPR 2021) as a reproducible, cached pipeline."""

__version__ = "0.1.0"
