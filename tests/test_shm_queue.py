"""The shared-memory queue between the server and the workers (engine/shm_queue.py), in one process."""
from __future__ import annotations

import queue

import numpy as np
import torch

from engine.messages import WorkItem
from engine.shm_queue import ShmQueue


def test_a_worker_gets_ordinary_tensors_even_inside_inference_mode():
    """A worker reads the items that arrive during a sampling batch between decode steps, inside
    torch.inference_mode; a training item read there must still be usable by autograd."""
    inbox = ShmQueue(numpy_out=False)
    weights = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    try:
        assert inbox.put(WorkItem("r1", "forward_backward", {"weights": weights})) == weights.nbytes
        assert inbox.put(WorkItem("r2", "forward_backward", {"weights": weights})) == weights.nbytes
        with torch.inference_mode():
            got = [inbox.get(timeout=30)]
            while len(got) < 2:
                try:
                    got.append(inbox.get_nowait())
                except queue.Empty:  # the feeder thread has not delivered it yet
                    pass
        for item in got:
            w = item.args["weights"]
            assert isinstance(w, torch.Tensor) and not w.is_inference()
            assert torch.equal(w, torch.from_numpy(weights))
            lp = torch.zeros(3, requires_grad=True)
            (-lp * w).sum().backward()  # what the cross-entropy loss does with them
            assert torch.equal(lp.grad, -w)
    finally:
        inbox.close()
