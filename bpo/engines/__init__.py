"""Generation engines: Hugging Face `generate` in-process, and an OpenAI-compatible inference server (vLLM, SGLang).

`decode.engine=hf` (the default and the reference) decodes in-process (hf.py); `decode.engine=vllm` sends the same
prompts to the server at `decode.server_url`. Nothing here imports vLLM: the server runs in its own
environment, started by slurm/common.sh (bpo_vllm_serve) or by hand.

- hf.py: batched in-process generation, split over ranks, ZeRO-3 or one copy per rank
- server.py: the server's client (prompts, checks against the local tokenizer, concurrency, errors)
- http.py: JSON over HTTP with retries and back-off (the client here, and chat.py's)
- chat.py: the chat-completions client the openai judge and the data builder share (API key, retries, replies)
- layout.py: a copy of a checkpoint under the weight names vLLM reads
- estimate.py: decode throughput formulas, for choosing an engine (bpo.plan prints the advice)
- cpu_server.py: a vLLM CPU server on loopback, for the tests and the benchmark
"""
