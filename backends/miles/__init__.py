"""The `miles` backend: megatron-core training with our own LoRA, plus a KV-cache sampler.

On GPU machines the production sampler is SGLang; on CPU machines (tests, laptops) the
in-process sampler in `sampler.py` serves the same API.
"""
