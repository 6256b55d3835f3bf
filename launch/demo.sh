#!/usr/bin/env bash
# The offline CPU demo behind `make demo`: tiny LLaVA + sample data -> blind responses -> reference cache ->
# 2-process ZeRO-3 BPO training -> export -> evaluation. Everything lands under demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PORT=${MASTER_PORT:-29533}

echo "== 1/3 tiny model and sample data"
[ -f demo/tiny/config.json ] || $PY -m bpo.tiny demo/tiny
[ -f demo/data/train.jsonl ] || $PY -m bpo.sample_data demo/data
$PY -m bpo.data.inspect demo/data/train.jsonl --image-root demo/data/images --model demo/tiny --max-length 160

echo "== 2/3 blind responses (the reference model, image withheld)"
$DS --num_gpus 2 --master_port $PORT bpo/generate_blind.py --config configs/demo.yaml \
    blind.input_file=demo/data/train.jsonl blind.output_file=demo/data/train_blind.jsonl

echo "== 3/3 BPO training, 2 processes, ZeRO-3 on CPU"
$DS --num_gpus 2 --master_port $PORT bpo/train.py --config configs/demo.yaml train.resume=true

echo "demo run directory: demo/run (metrics.jsonl, metrics.png, tensorboard/, checkpoints/)"
