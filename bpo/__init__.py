"""bpo: Blind Preference Optimization for vision-language assistants on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
