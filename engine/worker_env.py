"""The memory-allocator settings every worker process starts with (torch's and glibc's).

They are environment variables, read once when a process starts, so the pool sets them in its
own environment before it starts the workers (an operator's own value wins), and
`scripts/bench_throughput.py` gives its in-process run the same, so both sides of its
comparison allocate alike. No torch here: the benchmark's client imports this.

- `THP_MEM_ALLOC_ENABLE=1`: torch allocates large CPU tensors in transparent huge pages. A
  large-vocabulary model's logits are hundreds of MB a step, allocated and freed each time; with
  4 KB pages that was millions of page faults a step (BENCHMARKS.md, finding 6).
- `MALLOC_MMAP_THRESHOLD_` (32 MiB) and `MALLOC_TRIM_THRESHOLD_` (64 MiB): glibc keeps the blocks
  a step frees for the next one instead of handing them back to the kernel, which then has to
  fault them in and zero them again. glibc gets there by itself once it has freed a block that
  large (its dynamic threshold rises to the block's size, at most 32 MiB, and trimming to twice
  that), but it starts at 128 KiB: a worker that sampled before it trained faulted about 6500
  pages into every prefill and took 1.3-1.5x as long over it (finding 15). These two start it
  where a warmed-up process is. Blocks above 32 MiB still come from mmap (and huge pages).
"""
from __future__ import annotations

import os

WORKER_ENV = {
    "THP_MEM_ALLOC_ENABLE": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
}


def set_worker_env(environ=os.environ) -> None:
    """Put the settings in `environ` where they are not set already (a set value wins)."""
    for name, value in WORKER_ENV.items():
        environ.setdefault(name, value)
