"""Prefill FLOPs of LLaVA and Qwen-VL models with and without PAR, from their published
configurations.

Counts multiply-adds as 2 FLOPs. Per decoder layer over L prompt tokens (hidden h, FFN
width m, key/value width kv: h for LLaVA's full multi-head attention, smaller for Qwen's
grouped heads): projections 2 * L * (2 h^2 + 2 h kv), attention scores and values
2 * 2 * L^2 * h (full square, as FastV/PAR-style estimates count it), SwiGLU FFN
2 * 3 * L * h * m;
plus the LM head on the last position only (prefill emits one token). The vision tower
and projector run on every image whether PAR is on or not; PAR's own cost is counted
from its steps (relevance, the N x N similarity, kNN, routing, merge).

    python -m benchmarks.flops [--text-tokens 40] [--budget 64]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Decoder:
    layers: int
    hidden: int
    ffn: int
    vocab: int
    kv: int | None = None  # key/value width (heads x head dim); None: hidden

    def prefill(self, tokens: int) -> float:
        h, kv = self.hidden, self.kv or self.hidden
        per_layer = 4 * tokens * (h * h + h * kv) + 4 * tokens**2 * h + 6 * tokens * h * self.ffn
        return self.layers * per_layer + 2 * h * self.vocab


@dataclass(frozen=True)
class VisionTower:
    """CLIP ViT-L/14 at 336 px (LLaVA-1.5 and NeXT): 577 tokens a crop, plain GELU MLP."""
    layers: int = 24
    hidden: int = 1024
    ffn: int = 4096
    tokens: int = 577
    patch_dim: int = 3 * 14 * 14

    def flops(self, crops: int) -> float:
        t, h = self.tokens, self.hidden
        per_layer = 8 * t * h**2 + 4 * t**2 * h + 4 * t * h * self.ffn
        return crops * (self.layers * per_layer + 2 * (t - 1) * self.patch_dim * h)


@dataclass(frozen=True)
class Llava:
    name: str
    decoder: Decoder
    visual_tokens: int   # per image, what PAR reduces
    crops: int           # vision-tower passes per image (336 px each)
    separators: int = 0  # LLaVA-NeXT's row-end image_newline rows; PAR keeps one

    def projector(self) -> float:
        h = self.decoder.hidden
        return 2 * self.crops * 576 * (1024 * h + h * h)


@dataclass(frozen=True)
class QwenVL:
    """A Qwen-VL model at one image size. Its ViT runs on (H/p) x (W/p) patches (p = 14 or
    16) and merges 2x2 of them into one visual token, after smart_resize rounds each side
    to a multiple of 2p: N = (H/2p) x (W/2p)."""
    name: str
    decoder: Decoder
    width: int
    height: int
    patch: int
    vision_layers: int
    vision_hidden: int
    vision_ffn: int
    gated_mlp: bool          # Qwen2.5-VL's SwiGLU; Qwen3-VL's plain GELU MLP
    full_attention_layers: int   # the others attend within 112 px windows (Qwen2.5-VL)
    window_patches: int      # patches per window
    mergers: int             # Qwen3-VL's deepstack levels add mergers of the same size
    crops: int = 1
    separators: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        unit = 2 * self.patch
        return round(self.height / unit), round(self.width / unit)

    @property
    def visual_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    def vision_flops(self) -> float:
        p, h = 4 * self.visual_tokens, self.vision_hidden
        mlp = (6 if self.gated_mlp else 4) * p * h * self.vision_ffn
        dense = 8 * p * h * h + mlp
        windowed = self.vision_layers - self.full_attention_layers
        attention = 4 * p * h * (self.full_attention_layers * p + windowed * min(p, self.window_patches))
        embed = 2 * p * (3 * 2 * self.patch**2) * h
        merged = 4 * h
        merger = self.mergers * 2 * self.visual_tokens * (merged * merged + merged * self.decoder.hidden)
        return self.vision_layers * dense + attention + embed + merger


QWEN25_7B = Decoder(28, 3584, 18944, 152064, kv=512)
QWEN3_8B = Decoder(36, 4096, 12288, 151936, kv=1024)


def qwen25_vl_7b(width: int, height: int) -> QwenVL:
    return QwenVL(f"Qwen2.5-VL-7B {width}x{height}", QWEN25_7B, width, height, patch=14, vision_layers=32,
                  vision_hidden=1280, vision_ffn=3420, gated_mlp=True, full_attention_layers=4,
                  window_patches=64, mergers=1)


def qwen3_vl_8b(width: int, height: int) -> QwenVL:
    return QwenVL(f"Qwen3-VL-8B {width}x{height}", QWEN3_8B, width, height, patch=16, vision_layers=27,
                  vision_hidden=1152, vision_ffn=4304, gated_mlp=False, full_attention_layers=27,
                  window_patches=0, mergers=4)


QWEN_SIZES = [(448, 448), (1024, 1024), (1792, 1344)]


def par_flops(n: int, d: int, t: int, k: int, knn_k: int = 5) -> float:
    """PAR's own work for one image: relevance, similarity matrix, kNN/density, routing, merge."""
    return 2 * n * t * d + 2 * n * n * d + 10 * n * n + n * n * knn_k + 2 * n * k * d + 3 * n * d


VICUNA_7B = Decoder(32, 4096, 11008, 32000)
MODELS = [
    # Vicuna-7B / 13B (LLaMA-2 architecture), published configs.
    Llava("LLaVA-1.5-7B", VICUNA_7B, 576, 1),
    Llava("LLaVA-1.5-13B", Decoder(40, 5120, 13824, 32000), 576, 1),
    # llava-v1.6-vicuna-7b, AnyRes: the 576-token base view, then the unpadded tile grid,
    # each grid row ending in an image_newline, as vLLM counts them for each image size
    # (672x672: 576 + 2,304 visual tokens and 48 separators; not the nominal 5 x 576).
    Llava("LLaVA-NeXT-7B 672x672", VICUNA_7B, 576 + 2304, 5, separators=48),
    Llava("LLaVA-NeXT-7B 640x480", VICUNA_7B, 576 + 1728, 5, separators=36),
    Llava("LLaVA-NeXT-7B 336x336", VICUNA_7B, 576 + 576, 3, separators=24),
]


def table(text_tokens: int, budget_ratio: float, models=None) -> list[dict]:
    rows = []
    for model in models or MODELS:
        n = model.visual_tokens + model.separators
        kept_visual = max(1, round(model.visual_tokens * budget_ratio))
        k = kept_visual + (1 if model.separators else 0)
        full_llm = model.decoder.prefill(text_tokens + n)
        par_llm = model.decoder.prefill(text_tokens + k)
        vision = model.vision_flops() if isinstance(model, QwenVL) else VisionTower().flops(model.crops) + model.projector()
        par_cost = par_flops(model.visual_tokens, model.decoder.hidden, text_tokens, kept_visual)
        rows.append({
            "model": model.name, "visual_tokens": n, "kept": k, "text_tokens": text_tokens,
            "compression_pct": 100 * (1 - k / n),
            "llm_tflops_full": full_llm / 1e12, "llm_tflops_par": par_llm / 1e12,
            "llm_reduction_pct": 100 * (1 - par_llm / full_llm),
            "total_tflops_full": (full_llm + vision) / 1e12,
            "total_tflops_par": (par_llm + vision + par_cost) / 1e12,
            "total_reduction_pct": 100 * (1 - (par_llm + vision + par_cost) / (full_llm + vision)),
            "par_own_gflops": par_cost / 1e9,
        })
    return rows


def print_rows(rows: list[dict]) -> str:
    lines = [f"{'model':<28} {'N':>5} {'K':>4} {'text':>4} {'compr%':>6} {'LLM TF full':>11} "
             f"{'LLM TF PAR':>10} {'LLM -%':>6} {'total -%':>8} {'PAR GF':>7}"]
    for r in rows:
        lines.append(
            f"{r['model']:<28} {r['visual_tokens']:>5} {r['kept']:>4} {r['text_tokens']:>4} "
            f"{r['compression_pct']:>6.1f} {r['llm_tflops_full']:>11.2f} {r['llm_tflops_par']:>10.2f} "
            f"{r['llm_reduction_pct']:>6.1f} {r['total_reduction_pct']:>8.1f} {r['par_own_gflops']:>7.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-tokens", type=int, default=40,
                        help="prompt tokens besides the image (a short VQA question in LLaVA's template)")
    parser.add_argument("--budget", type=int, default=64, help="kept tokens per 576-token image")
    args = parser.parse_args()
    ratio = args.budget / 576

    out = [f"Prefill FLOPs, budget {args.budget}/576 of each image's visual tokens "
           f"({100 * (1 - ratio):.1f}% compression); N and K count every row the language model "
           "prefills, LLaVA-NeXT's separators included (PAR keeps one per image)"]
    rows = table(args.text_tokens, ratio)
    out.append(print_rows(rows))
    qwen = table(args.text_tokens, ratio, [build(w, h) for build in (qwen25_vl_7b, qwen3_vl_8b) for w, h in QWEN_SIZES])
    out.append("\nQwen-VL (dynamic resolution: N from the image size; vision tower with its windowed or "
               "full attention, merger(s) included in the totals):")
    out.append(print_rows(qwen))
    out.append("\nSensitivity to the text length (LLaVA-1.5-7B):")
    sweep = [table(t, ratio)[0] for t in (0, 16, 40, 64, 128)]
    out.append(print_rows(sweep))
    seven_b = rows[0]
    gap = seven_b["llm_reduction_pct"] - 83.0
    out.append(
        f"\nCheck against PAR's headline (89% compression -> about 83% fewer FLOPs): "
        f"LLaVA-1.5-7B LLM prefill -{seven_b['llm_reduction_pct']:.1f}% "
        f"({gap:+.1f} pp) with {args.text_tokens} text tokens; counting the unreduced vision "
        f"tower too, -{seven_b['total_reduction_pct']:.1f}%. The paper's figure is matched by the "
        f"language model's FLOPs with a short prompt; it depends on the text length (sweep above)."
    )
    report = "\n".join(out)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flops.txt").write_text(report + "\n")
    (RESULTS / "flops.json").write_text(json.dumps({"rows": rows, "qwen_rows": qwen, "text_sweep": sweep}, indent=2))


if __name__ == "__main__":
    main()
