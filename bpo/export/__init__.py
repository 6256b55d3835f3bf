"""ZeRO-3 checkpoints -> Hugging Face safetensors directories (`python -m bpo.export`): full weights (job), LoRA
adapters or merged weights (lora)."""
