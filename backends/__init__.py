"""Training backends: what a worker process can do with models (build, train, sample).

`TINKERCLOUD_BACKEND` picks one; every backend implements `backends.base.TrainingBackend`.
"""
from __future__ import annotations


def load_backend(spec):
    """Build the backend named by `spec.backend` inside a worker process."""
    if spec.backend == "miles":
        from backends.miles.backend import MilesBackend

        return MilesBackend(spec)
    if spec.backend == "nemo_rl":
        raise NotImplementedError("the nemo_rl backend is not available in this build yet; use TINKERCLOUD_BACKEND=miles")
    raise ValueError(f"unknown backend {spec.backend!r}")
