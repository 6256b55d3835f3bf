from setuptools import find_packages, setup

setup(
    name="bpo",
    version="0.1.0",
    description="Blind Preference Optimization for vision-language models on DeepSpeed ZeRO-3",
    packages=find_packages(include=["bpo", "bpo.*"]),
    package_data={"bpo": ["*.txt", "**/*.txt", "configs/*.yaml", "templates/*.jinja", "demo/tiny/templates/*"]},
    python_requires=">=3.10",
    # Ranges a user installs with. Their lower bounds are the versions the whole suite passed with
    # (requirements/lock.txt, which `make venv` and CI install exactly); the upper bounds stop at the next major
    # release, and DeepSpeed's at its next minor one, since bpo works around its internals (bpo.optim). `make
    # test-latest` runs the fast subset on the newest releases these ranges allow.
    install_requires=[
        "torch>=2.14,<3",
        "torchvision>=0.29",  # transformers 5 builds the Qwen2-VL / Qwen2.5-VL / OneVision / InternVL processors with it
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.25,<6",
        "safetensors",
        "tokenizers",
        "jsonlines",
        "pillow",
        "pyarrow>=26",  # parquet as `datasets` writes it (bpo/data/formats.py); no upper bound: majors come quarterly
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "bitsandbytes",  # optim.name=adamw_8bit / paged_adamw_8bit, model.finetune=qlora (bpo/optim.py, bpo/model/lora.py)
        "peft>=0.22,<1",  # model.finetune=lora / qlora: adapters (bpo/model/lora.py) and their export (bpo/export/lora.py)
        "accelerate",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 construction); not used for training
    ],
    extras_require={
        # Packages that some families' processors import (docs/families.md); bpo names the missing one at
        # start (bpo.data.chat.load_chat). SmolVLM / SmolVLM2 spell image positions out in words with num2words.
        "families": ["num2words"],
        "test": ["pytest", "pytest-xdist", "triton", "num2words"],  # num2words: the SmolVLM2 replica's processor
        "gpu": ["flash-attn"],
        "vllm": ["vllm"],  # the server for decode.engine=vllm; the client side is stdlib (bpo/engines/server.py)
        "bench": ["liger-kernel"],
    },
)
