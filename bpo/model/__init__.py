"""The model side: loading a checkpoint (load), its parts and which of them train (parts), scoring responses with it
(scorer), LoRA/QLoRA adapters (lora), the reference model (reference) and mixture-of-experts helpers (moe).
Imports run one way: load -> lora -> parts; reference -> lora; scorer needs neither loading nor parts, which keeps
the reference cache's fingerprint (bpo.ref_cache.fingerprint.SCORING_CODE) to the code its numbers depend on."""
