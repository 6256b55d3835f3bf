"""The model side: loading a checkpoint (load), LoRA/QLoRA adapters (lora), the reference model (reference) and
mixture-of-experts helpers (moe)."""
