#!/usr/bin/env bash
# The offline CPU smoke run behind `make smoke`, the whole BPO chain on 2 CPU ranks with ZeRO-3:
# tiny LLaVA + sample data -> blind responses -> reference log-prob cache -> BPO training -> export -> evaluation.
# Everything lands under smoke/. Every step is resumable: rerunning after a kill continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PORT=${MASTER_PORT:-29533}
CFG=configs/smoke.yaml

echo "== 1/6 tiny model and sample data"
[ -f smoke/tiny/config.json ] || $PY -m bpo.demo.tiny smoke/tiny
[ -f smoke/data/train.jsonl ] || $PY -m bpo.demo.sample_data smoke/data
$PY -m bpo.data.inspect smoke/data/train.jsonl --image-root smoke/data/images --model smoke/tiny --max-length 160

echo "== 2/6 blind responses: the reference model answers with the image withheld"
$DS --num_gpus 2 --master_port $PORT bpo/generate_blind.py --config $CFG

echo "== 3/6 reference log-probs, cached once so training never loads the reference"
$DS --num_gpus 2 --master_port $PORT bpo/ref_logprobs.py --config $CFG

echo "== 4/6 BPO training (2 ranks, ZeRO-3), exported to smoke/run/hf_model at the end"
$DS --num_gpus 2 --master_port $PORT bpo/train.py --config $CFG train.resume=true

echo "== 5/6 evaluation of the exported model (rule-based refusal judge, offline)"
$DS --num_gpus 2 --master_port $PORT bpo/evaluate.py --config $CFG

echo "== 6/6 done: smoke/run (metrics.jsonl, metrics.png, tensorboard/, checkpoints/, hf_model/), smoke/eval/report.md"
