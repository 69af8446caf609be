"""`python tinkercloud.py` with no model configured generates and serves the tiny default."""
from __future__ import annotations

from pathlib import Path

import tinker
from tinker import types

from tests.conftest import API_KEY, ServerProcess


def test_server_generates_and_serves_the_embedded_model(tmp_path):
    srv = ServerProcess(tmp_path / "data", models={}).start()
    try:
        service = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        caps = tinker.RestClient(base_url=srv.url, api_key=API_KEY).get_server_capabilities().result()
        assert [m.model_name for m in caps.supported_models] == ["tinkercloud/tiny-qwen3"]
        trainer = service.create_lora_training_client("tinkercloud/tiny-qwen3", rank=2).result()
        tokenizer = trainer.get_tokenizer()  # offline: the server names its local tokenizer folder
        assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
        ids = tokenizer.encode("a tiny model works out of the box")
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        assert trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
        assert (tmp_path / "data" / "models" / "tiny-qwen3" / "tokenizer.json").is_file()
        # its logits (151936 wide) are hundreds of MB a step: the workers allocate them in huge
        # pages, and glibc keeps what a step frees for the next one (engine/worker_env.py)
        for pid in srv.health()[1]["workers"]:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for setting in (b"THP_MEM_ALLOC_ENABLE=1", b"MALLOC_MMAP_THRESHOLD_=33554432", b"MALLOC_TRIM_THRESHOLD_=67108864"):
                assert setting in environ, (pid, setting)
    finally:
        srv.stop()
