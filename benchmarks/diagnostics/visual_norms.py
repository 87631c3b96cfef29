"""How large a trained model's visual tokens are next to its word embeddings.

For a model `benchmarks.train_vqa` saved, the mean L2 norm of the visual tokens its
projector (LLaVA) or merger (Qwen2.5-VL) emits for held-out composites, and the mean norm of
the language model's input word embeddings: the language model reads both in one sequence.

    python -m benchmarks.diagnostics.visual_norms --model .models/vqa-qwen
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.composite_vqa import make_composites
from benchmarks.train_vqa import FAMILIES, load_saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=8, help="held-out composites")
    args = parser.parse_args()
    model, tokenizer, _, about = load_saved(args.model.resolve())
    arch = FAMILIES[about.get("family", "llava")](about["training"]["grid"], about["training"]["patch"])
    processor = arch.processor(tokenizer)
    composites = make_composites("train", args.count, grid=arch.grid, seed=10_000)
    with torch.no_grad():
        visual = arch.features(model.eval(), arch.pixels(processor, [c.image() for c in composites]))
    words = model.get_input_embeddings().weight.detach()
    print(f"{args.model}: visual tokens {visual.norm(dim=-1).mean():.1f} (mean L2 norm over {visual.shape[0]} "
          f"composites x {visual.shape[1]} tokens), word embeddings {words.norm(dim=-1).mean():.2f}")


if __name__ == "__main__":
    main()
