"""The generic Hugging Face checkpoint engine: safetensors reading, layout-free names, the
streaming loader and the sharded exporter. It names no model family: each family describes
its checkpoints with an :class:`~ling_pretrain.checkpoint.hf.adapter.HFAdapter` (config.json
mapping and a tensor table in the vocabulary of :mod:`~ling_pretrain.checkpoint.hf.rules`),
and callers pass that adapter in.
"""
