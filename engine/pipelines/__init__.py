"""Ray wrappers around the pure stage cores: `prepare` (Ray Data); later `pretrain`/`finetune` and `map`."""
