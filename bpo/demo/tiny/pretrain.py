"""Give a tiny LLaVA's vision tower what a real one brings from CLIP pretraining: features that tell objects apart.

A random vision tower passes pixels through, but a tiny language model cannot learn shapes from a few hundred
captioned pictures; real LLaVA gets its object features from CLIP, pretrained on millions of images. This stands in
for that step: the tower learns to classify labelled images through a linear head on the mean of the patch features
LLaVA's projector reads (hidden_states[vision_feature_layer], CLS dropped); the head is then thrown away and the
checkpoint is saved with the trained tower, everything else untouched.
"""

import os
from bpo.demo.tiny.llava import save_atomically


def pretrain_vision_tower(model_dir, images, labels, steps=400, lr=3e-3, batch_size=64, seed=0, log=print):
    """Train the vision tower of the checkpoint in model_dir in place (rewritten atomically) on PIL `images` with
    integer `labels`; returns the training accuracy of the last 100 steps."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]  # (N, C, H, W)
    targets = torch.as_tensor(labels)  # (N,)
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    head = torch.nn.Linear(tower.config.hidden_size, int(targets.max()) + 1)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    hits = []
    tower.train()
    for step in range(steps):
        idx = torch.randint(0, len(targets), (batch_size,), generator=generator)
        features = tower(pixels[idx], output_hidden_states=True).hidden_states[layer][:, 1:]  # (B, patches, D)
        logits = head(features.mean(1))  # (B, classes)
        loss = torch.nn.functional.cross_entropy(logits, targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hits.append((logits.argmax(-1) == targets[idx]).float().mean().item())
        if log and (step + 1) % 100 == 0:
            log(f"vision pretraining: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                f"accuracy (last 100 steps) {sum(hits[-100:]) / len(hits[-100:]):.3f}")
    tower.eval()
    save_atomically(os.path.abspath(model_dir), model, processor)
    return sum(hits[-100:]) / len(hits[-100:])
