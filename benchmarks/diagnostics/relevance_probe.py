"""Which visual tokens does a relevance score point at? Step 1 of PAR measured alone.

For held-out composite easy-VQA questions (see composite_vqa.py), score every visual
token of the image against the rewritten prompt, and count how often the top tokens lie
on the tile the question asks about (chance: 1 / tiles). Besides PAR's own score (max
cosine to the prompt's word embeddings), it scores the same tokens in other training-free
ways, to tell apart "the visual tokens say nothing about words" from "cosine in the
embedding table is the wrong ruler":

  cos          max_j cos(v_i, q_j) in the input embedding table over every content word
               of the prompt: PAR's relevance with par_drop_question_type_words=false
  cos_3x3      cos averaged over each token's 3x3 neighbourhood on the patch grid
  mean         mean_j cos(v_i, q_j)
  zscore       max_j of cos(v_i, q_j) standardised over the image's tokens, so a prompt
               word that is close to every visual token ("color") cannot drown out the
               word that tells tokens apart ("triangle")
  vocab        max_j cos(v_i, q_j) minus a soft maximum of v_i's cosines to the whole
               vocabulary (temperature 0.05): how much q_j stands out among all words
               for this token, so tokens close to every word do not win
  named_word   cos to the pieces of the one attribute word that names the tile (an
               oracle: what a perfect prompt rewrite would give cosine)
  named_object named_word averaged over each shape's patches (oracle segmentation;
               background scores lowest): can the word pick the object when per-token
               noise is averaged away?
  centered     the same after removing the image's mean token and the table's mean word
  peak_word    cos to the one prompt word whose z-scored cosine peaks highest in the
               image (a training-free guess at named_word: the word that singles
               tokens out)
  knn_soft     cos averaged over visually similar tokens of the image (weights
               softmax((cos(v_i, v_k) - 1) / 0.05)): feature-space smoothing, so an
               object's patches share their relevance where grid smoothing mixes in
               the tile's background
  cos_subject  PAR's relevance as it runs by default: cos with the question-type words
               ("color", "shape") dropped from the prompt (par_vllm.prompt)
  attention0   the language model's own first-layer attention: max_j mean over heads of
               cos(W_k norm(v_i), W_q norm(q_j)) (no rotary term)
  lens         log p(q_j | v_i) when the tied output head reads v_i (a "logit lens" on
               the input), max over j

It also reports `alignment`: the share of on-shape patches whose nearest of the 11
colour and shape words is their own colour or shape (chance 2/11), and the geometry that
decides whether cosine can single a tile out: the mean norm of visual tokens and of word
embeddings, the mean cosine between two visual tokens of one image (near 1: the tokens
share one direction and differ only in a small remainder), and the named word's mean
cosine to the queried tile's shape patches against the other tiles' shape patches.

    .venv/bin/python -m benchmarks.diagnostics.relevance_probe --model .models/vqa4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import add_composite_arguments, grid_average, model_about, model_words, write_results
from benchmarks.composite_vqa import COLORS, SHAPES, TILE_PX, Composite, make_composites
from par_vllm.explain import Explainer


class Scores:
    def __init__(self, explainer: Explainer):
        model = explainer.model
        self.embed = model.get_input_embeddings().weight.detach()
        self.mean_word = self.embed.mean(0)
        self.embed_n = F.normalize(self.embed, dim=-1)
        layer = model.model.language_model.layers[0]
        self.norm, self.attn = layer.input_layernorm, layer.self_attn
        config = model.config.text_config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads

    @torch.no_grad()
    def __call__(self, v: torch.Tensor, q: torch.Tensor, q_ids: torch.Tensor,
                 named: torch.Tensor, subject: torch.Tensor) -> dict[str, torch.Tensor]:
        v_n = F.normalize(v, dim=-1)
        cos = v_n @ F.normalize(q, dim=-1).T
        zscore = (cos - cos.mean(0)) / cos.std(0).clamp(min=1e-6)
        to_vocab = v_n @ self.embed_n.T
        vocab = cos - 0.05 * torch.logsumexp(to_vocab / 0.05, dim=-1, keepdim=True)
        named_cos = v_n @ F.normalize(self.embed[named], dim=-1).T
        subject_cos = v_n @ F.normalize(self.embed[subject], dim=-1).T
        centered = F.normalize(v - v.mean(0), dim=-1) @ F.normalize(q - self.mean_word, dim=-1).T
        keys = self.attn.k_proj(self.norm(v)).view(-1, self.kv_heads, self.head_dim)
        keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
        queries = self.attn.q_proj(self.norm(q)).view(-1, self.heads, self.head_dim)
        attention = torch.einsum("nhd,thd->nt", F.normalize(keys, dim=-1), F.normalize(queries, dim=-1)) / self.heads
        lens = (v @ self.embed.T).log_softmax(-1)[:, q_ids]
        smooth = grid_average(cos.amax(-1))
        peak_word = cos[:, zscore.amax(0).argmax()]
        knn_soft = torch.softmax((v_n @ v_n.T - 1) / 0.05, dim=-1) @ cos.amax(-1)
        return {"cos": cos.amax(-1), "cos_3x3": smooth, "mean": cos.mean(-1), "zscore": zscore.amax(-1), "vocab": vocab.amax(-1),
                "named_word": named_cos.amax(-1), "centered": centered.amax(-1), "peak_word": peak_word,
                "knn_soft": knn_soft, "cos_subject": subject_cos.amax(-1), "attention0": attention.amax(-1),
                "lens": lens.amax(-1)}


def object_mean(score: torch.Tensor, on_shape: np.ndarray, composite, side: int) -> torch.Tensor:
    """Each shape patch gets the mean score of its tile's shape patches; background -1e9
    (it comes last, in index order, so top-k stays well defined)."""
    out = torch.full_like(score, -1e9)
    for t in range(len(composite.tiles)):
        mask = torch.from_numpy(on_shape & Composite(composite.tiles, composite.grid, t, "", "", "")
                                .patch_mask(side))
        if mask.any():
            out[mask] = score[mask].mean()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_composite_arguments(parser, count=200)
    parser.add_argument("--top", type=int, default=8, help="also count the share of the top-k on the tile")
    args = parser.parse_args(argv)

    explainer = Explainer(args.model.resolve())
    scores = Scores(explainer)
    tokenizer = explainer.tokenizer
    words = F.normalize(torch.stack([scores.embed[tokenizer.encode(" " + w, add_special_tokens=False)].mean(0)
                                     for w in COLORS + SHAPES]), dim=-1)
    composites = make_composites("test", args.count, grid=explainer.config.vision_config.image_size // TILE_PX,
                                 seed=args.seed)
    patch = explainer.config.vision_config.patch_size
    hits: dict[str, list[tuple[float, float]]] = {}
    aligned = shown = 0
    geometry: dict[str, list[float]] = {k: [] for k in ("visual_norm", "pairwise_cos", "named_on_target",
                                                         "named_elsewhere")}
    for c in tqdm(composites, desc="relevance probe"):
        v = explainer.visual_tokens(c.image())[0]
        # Every rescoring reads all the prompt's content words ("color" too): they are ways
        # to cope with such words without knowing which they are.
        prompt_ids = tokenizer.encode(f"{explainer.processor.image_token}\n{c.question}")
        ids = explainer.rewriter(prompt_ids, drop_question_type=False)
        subject_ids = torch.tensor(explainer.rewriter(prompt_ids), dtype=torch.long)
        q_ids = torch.tensor(ids, dtype=torch.long)
        side = int(v.shape[0] ** 0.5)
        tile = c.patch_mask(side)
        word = c.tiles[c.target].shape if c.asks == "color" else c.tiles[c.target].color
        named = torch.tensor(tokenizer.encode(" " + word, add_special_tokens=False), dtype=torch.long)
        color, shape = c.patch_labels(patch)
        on_shape = color < len(COLORS)
        by_tile = scores(v, scores.embed[q_ids], q_ids, named, subject_ids)
        by_tile["named_object"] = object_mean(by_tile["named_word"], on_shape, c, side)
        for name, score in by_tile.items():
            top = score.topk(args.top).indices.numpy()
            hits.setdefault(name, []).append((float(tile[top[0]]), float(tile[top].mean())))
        nearest = (F.normalize(v, dim=-1) @ words.T).argmax(-1).numpy()
        aligned += int(((nearest == color) | (nearest == len(COLORS) + shape))[on_shape].sum())
        shown += int(on_shape.sum())
        v_n = F.normalize(v, dim=-1)
        named_cos = (v_n @ F.normalize(scores.embed[named].mean(0), dim=0)).numpy()
        geometry["visual_norm"].append(v.norm(dim=-1).mean().item())
        geometry["pairwise_cos"].append((v_n @ v_n.T).mean().item())
        geometry["named_on_target"].append(float(named_cos[on_shape & tile].mean()))
        geometry["named_elsewhere"].append(float(named_cos[on_shape & ~tile].mean()))

    tiles = len(composites[0].tiles)
    geometry = {k: float(np.nanmean(g)) for k, g in geometry.items()}
    geometry["word_norm"] = scores.embed.norm(dim=-1).mean().item()
    rows = [{"score": name, "top1_on_tile": float(np.mean([h[0] for h in rows])),
             f"top{args.top}_on_tile": float(np.mean([h[1] for h in rows]))} for name, rows in hits.items()]
    lines = [f"relevance probe: {len(composites)} composite easy-VQA test questions, {tiles} tiles "
             f"(chance on tile: {1 / tiles:.3f}); model: {model_words(model_about(args.model), args.model)}",
             f"alignment (nearest of the 11 attribute words is the patch's own colour or shape; chance "
             f"{2 / 11:.3f}): {aligned / shown:.3f}",
             f"norms: visual tokens {geometry['visual_norm']:.2f}, word embeddings {geometry['word_norm']:.2f}; "
             f"mean cosine between two visual tokens of an image {geometry['pairwise_cos']:.3f}",
             f"cosine of the named word to the queried tile's shape patches {geometry['named_on_target']:.4f}, "
             f"to other tiles' shape patches {geometry['named_elsewhere']:.4f}", "",
             f"{'score':<12}{'top-1 on tile':>15}{f'top-{args.top} on tile':>15}"]
    lines += [f"{r['score']:<12}{r['top1_on_tile']:>15.3f}{r[f'top{args.top}_on_tile']:>15.3f}" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out / f"relevance-probe-{args.name}", text, {
        "model": str(args.model), "count": len(composites), "seed": args.seed, "chance": 1 / tiles,
        "alignment": aligned / shown, "geometry": geometry, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
