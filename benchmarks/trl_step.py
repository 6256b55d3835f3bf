"""TRL's DPOTrainer on the step benchmark's model and data (run by benchmarks/step_bench.py, in .venv-bench).

    python benchmarks/trl_step.py MODEL_DIR DATA_JSONL IMAGE_ROOT OUT_JSON STEPS

The bpo records are given to TRL in its conversational vision format ({"images", "prompt", "chosen", "rejected"});
everything else is TRL's default (plain PyTorch, one process, reference model copied from the policy). Writes the
wall and CPU time of every step after the first, peak resident memory and positions computed per example.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conversation(record):
    """bpo's parsed turns as TRL prompt messages, the image in its turn."""
    messages = []
    for turn in record.turns:
        content = ([{"type": "image"}] if turn.has_image else []) + [{"type": "text", "text": turn.text}]
        messages.append({"role": turn.role, "content": content})
    return messages


def main():
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from bpo.data.records import load_records

    model_dir, data_file, image_root, out, steps = sys.argv[1:6]
    records, _ = load_records(data_file, image_root)
    rows = [{"images": [Image.open(os.path.join(image_root, r.image)).convert("RGB")], "prompt": conversation(r),
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r.chosen}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r.rejected}]}]} for r in records]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    positions = []

    class CountingCollator(DataCollatorForVisionPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            positions.append(batch["input_ids"].numel() / len(examples))
            return batch

    times = {"step": [], "cpu": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t, self.c = time.time(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times["step"].append(time.time() - self.t)
            times["cpu"].append(time.process_time() - self.c)

    args = DPOConfig(output_dir=os.path.join(os.path.dirname(out), "trl_out"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=1, max_steps=int(steps), learning_rate=1e-6, beta=0.1,
                     max_length=None, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     dataloader_num_workers=0, remove_unused_columns=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         data_collator=CountingCollator(processor), callbacks=[Timer()])
    trainer.train()
    result = {"step": times["step"][1:], "cpu": times["cpu"][1:],
              "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "positions": sum(positions) / len(positions)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
