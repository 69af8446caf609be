"""The allocator settings every worker starts with (engine/worker_env.py). That the workers get
them is tested through a real server (tests/test_embedded_default_e2e.py); what they save is a
benchmark (BENCHMARKS.md, finding 15), not a test."""
from __future__ import annotations

from engine.worker_env import WORKER_ENV, set_worker_env


def test_the_settings_fill_in_what_is_not_set_and_an_operators_own_value_wins():
    environ = {"MALLOC_TRIM_THRESHOLD_": "0"}
    set_worker_env(environ)
    assert environ == {**WORKER_ENV, "MALLOC_TRIM_THRESHOLD_": "0"}
    assert WORKER_ENV["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)  # glibc's own ceiling for its dynamic threshold
