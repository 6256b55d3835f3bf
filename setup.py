from setuptools import find_packages, setup

setup(
    name="bpo",
    version="0.1.0",
    description="Blind Preference Optimization for vision-language models on DeepSpeed ZeRO-3",
    packages=find_packages(include=["bpo", "bpo.*"]),
    package_data={"bpo": ["*.txt", "**/*.txt", "configs/*.yaml", "templates/*.jinja", "tiny/templates/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",  # transformers 5 builds the Qwen2-VL / Qwen2.5-VL / OneVision / InternVL processors with it
        "deepspeed>=0.16",
        "transformers>=5.0",
        "safetensors",
        "tokenizers",
        "jsonlines",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "bitsandbytes",  # optim.name=adamw_8bit / paged_adamw_8bit, model.finetune=qlora (bpo/optim.py, bpo/lora.py)
        "peft>=0.21",  # model.finetune=lora / qlora: adapters (bpo/lora.py) and their export (bpo/export_lora.py)
        "accelerate",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 construction); not used for training
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "triton"],
        "gpu": ["flash-attn"],
        "vllm": ["vllm"],  # the server for decode.engine=vllm; the client side is stdlib (bpo/engines/server.py)
        "bench": ["liger-kernel"],
    },
)
