"""Configuration sources: flags over environment over YAML, and the seed's variable names."""
from __future__ import annotations

import pytest

from engine.config import Config, ServedModel


def test_environment_variables_of_the_original_description(tmp_path):
    cfg = Config.from_env({
        "TINKERCLOUD_BACKEND": "miles", "TRAINING_HOST": "127.0.0.1", "TRAINING_PORT": "9001",
        "TINKER_API_KEY": "tml-a,tml-b", "METADATA_DIR": str(tmp_path / "meta"), "FUTURES_DB_NAME": "f.db",
        "SUPPORTED_MODELS": '[{"model_name": "Qwen/Qwen3-8B", "path": "/models/q"}, "llama=/models/l"]',
        "ALLOW_PARTIAL_BATCHES": "true",
    })
    assert (cfg.host, cfg.port, cfg.api_keys) == ("127.0.0.1", 9001, ("tml-a", "tml-b"))
    assert cfg.futures_path == str(tmp_path / "meta" / "f.db")
    assert cfg.models == (ServedModel("Qwen/Qwen3-8B", "/models/q"), ServedModel("llama", "/models/l"))
    assert cfg.allow_partial_batches is True


def test_flags_override_environment_which_overrides_yaml(tmp_path, monkeypatch):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("port: 7000\nworkers: 2\ndata_dir: /d\n")
    monkeypatch.setenv("TRAINING_PORT", "7001")
    monkeypatch.setenv("TINKERCLOUD_LORA_COMPUTE", "base")
    monkeypatch.setenv("TINKERCLOUD_INTERLEAVE_SHARE", "0.25")
    monkeypatch.setenv("TINKERCLOUD_KERNELS", "eager")
    monkeypatch.setenv("TINKERCLOUD_SAMPLE_GATHER_MS", "5")
    cfg = Config.from_args(["--config", str(yaml_file), "--workers", "3", "--model", "m=/p"])
    assert (cfg.port, cfg.workers, cfg.data_dir, cfg.lora_compute) == (7001, 3, "/d", "base")
    assert cfg.interleave_share == 0.25 and Config().interleave_share == 0.5
    assert Config.from_args(["--lora-compute", "float32"]).lora_compute == "float32"
    assert Config.from_args(["--interleave-share", "1"]).interleave_share == 1.0
    assert (cfg.sample_gather_ms, Config.from_args(["--sample-gather-ms", "0"]).sample_gather_ms) == (5.0, 0.0)
    assert Config().sample_gather_ms == 2.0
    assert (cfg.kernels, Config.from_args(["--kernels", "compiled"]).kernels, Config().kernels) == \
        ("eager", "compiled", "eager")
    assert Config.from_args(["--kernels", "compiled_layers"]).kernels == "compiled_layers"
    assert cfg.futures_path == "/d/futures" and cfg.models == (ServedModel("m", "/p"),)


def test_bad_configuration_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="tml-"):
        Config(api_keys=("secret",))
    with pytest.raises(ValueError, match="TINKERCLOUD_BACKEND"):
        Config(backend="other")
    with pytest.raises(ValueError, match="TINKERCLOUD_LORA_COMPUTE"):
        Config(lora_compute="fp8")
    with pytest.raises(ValueError, match="TINKERCLOUD_KERNELS"):
        Config(kernels="fast")
    with pytest.raises(ValueError, match="TINKERCLOUD_INTERLEAVE_SHARE must be between 0 and 1"):
        Config(interleave_share=1.5)
    with pytest.raises(ValueError, match="TINKERCLOUD_SAMPLE_GATHER_MS"):
        Config(sample_gather_ms=-1)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("prot: 7000\n")
    with pytest.raises(ValueError, match="unknown config field 'prot'"):
        Config.from_file(yaml_file)

