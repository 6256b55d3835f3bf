"""Generation engines other than Hugging Face `generate`: an OpenAI-compatible inference server (vLLM, SGLang).

`decode.engine=hf` (the default and the reference) decodes in-process with bpo.generate; `decode.engine=vllm`
sends the same prompts to the server at `decode.server_url` (bpo.engines.server). Nothing here imports vLLM: the
server runs in its own environment, started by slurm/vllm_serve.sh or by hand.
"""
