"""Generation engines other than Hugging Face `generate`: an OpenAI-compatible inference server (vLLM, SGLang).

`decode.engine=hf` (the default and the reference) decodes in-process with bpo.engines.hf; `decode.engine=vllm`
sends the same prompts to the server at `decode.server_url`. Nothing here imports vLLM: the server runs in its own
environment, started by slurm/common.sh (bpo_vllm_serve) or by hand.

- server.py: the client (prompts, checks against the local tokenizer, concurrency, errors)
- http.py: JSON over HTTP with retries and back-off (the client here, and chat.py's)
- chat.py: the chat-completions client the openai judge and the data builder share (API key, retries, replies)
- layout.py: a copy of a checkpoint under the weight names vLLM reads
- estimate.py: decode throughput formulas, for choosing an engine (bpo.plan prints the advice)
- cpu_server.py: a vLLM CPU server on loopback, for the tests and the benchmark
"""
