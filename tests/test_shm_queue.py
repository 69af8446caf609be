"""The shared-memory queue between the server and the workers (engine/shm_queue.py), in one process."""
from __future__ import annotations

import queue

import numpy as np
import torch

from engine.messages import WorkItem, WorkResult
from engine.shm_queue import SHM_MIN_BYTES, ShmQueue, to_shared


def _get(q: ShmQueue):
    return q.get(timeout=30)


def test_small_arrays_travel_inline_and_large_ones_through_shared_memory():
    """A batch of short prompts or datums must not cost one shared-memory segment (a file
    descriptor fetched with a round trip) per array: below SHM_MIN_BYTES they are pickled into
    the message. Either way the workers' end gets tensors and the server's end numpy arrays."""
    small = np.arange(32, dtype=np.int64)
    large = np.linspace(0, 1, SHM_MIN_BYTES // 4, dtype=np.float32)
    msg = WorkItem("r", "sample", {"requests": [{"prompt": small + i} for i in range(8)], "big": large,
                                   "bf16": torch.ones(3, dtype=torch.bfloat16), "t": torch.arange(5)})
    ready = to_shared(msg)
    assert all(isinstance(r["prompt"], np.ndarray) for r in ready.args["requests"])  # inline
    assert isinstance(ready.args["big"], torch.Tensor)  # its storage goes to shared memory
    assert isinstance(ready.args["bf16"], torch.Tensor)  # numpy has no bfloat16: stays a tensor
    assert isinstance(ready.args["t"], np.ndarray)

    inbox, outbox = ShmQueue(numpy_out=False), ShmQueue(numpy_out=True)
    try:
        carried = inbox.put(msg)
        assert carried == 8 * small.nbytes + large.nbytes + 3 * 2 + 5 * 8
        got = _get(inbox).args
        for i, r in enumerate(got["requests"]):
            assert isinstance(r["prompt"], torch.Tensor) and torch.equal(r["prompt"], torch.from_numpy(small + i))
        assert torch.equal(got["big"], torch.from_numpy(large)) and torch.equal(got["t"], torch.arange(5))
        assert got["bf16"].dtype == torch.bfloat16

        result = {"logprobs": torch.full((7,), -0.5), "big": torch.from_numpy(large).clone()}
        assert outbox.put(WorkResult("r", result=result)) == 7 * 4 + large.nbytes
        back = _get(outbox).result
        assert isinstance(back["logprobs"], np.ndarray) and np.array_equal(back["logprobs"], np.full(7, -0.5, np.float32))
        assert isinstance(back["big"], np.ndarray) and np.array_equal(back["big"], large)
    finally:
        inbox.close()
        outbox.close()


def test_a_worker_gets_ordinary_tensors_even_inside_inference_mode():
    """A worker reads the items that arrive during a sampling batch between decode steps, inside
    torch.inference_mode; a training item read there must still be usable by autograd."""
    inbox = ShmQueue(numpy_out=False)
    weights = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    try:
        assert inbox.put(WorkItem("r1", "forward_backward", {"weights": weights})) == weights.nbytes
        assert inbox.put(WorkItem("r2", "forward_backward", {"weights": weights})) == weights.nbytes
        with torch.inference_mode():
            got = [_get(inbox)]
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
