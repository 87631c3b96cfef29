"""par-vllm explain: PAR's decisions drawn over the image."""

import numpy as np
from PIL import Image

from par_vllm.cli import main
from par_vllm.demo import demo_image


def test_explain_renders_kept_and_merged_patches(demo_model, tmp_path, capsys):
    image_path = tmp_path / "shapes.png"
    demo_image().save(image_path)
    out = tmp_path / "kept.png"
    main(["explain", str(image_path), "What color is the triangle?", "--model", str(demo_model),
          "--out", str(out), "--num-tokens", "64"])
    assert capsys.readouterr().out.strip() == str(out)
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    plain = np.asarray(demo_image().resize(drawn.shape[:2][::-1]), dtype=np.int16)
    assert drawn.shape == (672, 672, 3)
    changed = (np.abs(drawn - plain).sum(-1) > 30).mean()
    assert 0.3 < changed < 1.0, "kept outlines and merged tints cover the grid, not all of it"


def test_explain_shows_dropped_patches_for_a_pruning_baseline(demo_model, tmp_path):
    image_path = tmp_path / "shapes.png"
    demo_image().save(image_path)
    out = tmp_path / "random.png"
    main(["explain", str(image_path), "What color is the triangle?", "--model", str(demo_model),
          "--out", str(out), "--num-tokens", "64", "--method", "random"])
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    plain = np.asarray(demo_image().resize(drawn.shape[:2][::-1]), dtype=np.int16)
    darker = ((plain - drawn).sum(-1) > 100).mean()
    assert darker > 0.5, "most patches (512 of 576) are dropped and greyed out"


def test_each_prompt_keeps_the_tokens_most_relevant_to_it(demo_model):
    """The same image, reduced for two questions by the model's own features and embeddings:
    each keeps (retrieves) the two tokens most relevant to its own question, which are not
    the other question's two."""
    import torch
    import torch.nn.functional as F

    from par_vllm.explain import Explainer
    from par_vllm.reduction import relevance
    from par_vllm.settings import ParSettings

    explainer = Explainer(demo_model)
    visual = explainer.visual_tokens(demo_image())
    best = []
    for question in ("What color is the triangle?", "Where is the blue circle?"):
        query = explainer.query(question)
        rel, _ = relevance(F.normalize(visual, dim=-1), F.normalize(query, dim=-1),
                           torch.ones(1, query.shape[1], dtype=torch.bool), "max")
        top2 = set(rel[0].topk(2).indices.tolist())
        reduction = explainer.reduce(demo_image(), question, ParSettings())
        kept = set(reduction.kept_indices[0].tolist())
        assert len(kept) == 64 and top2 <= kept
        assert top2 <= set(torch.nonzero(reduction.retrieved[0]).flatten().tolist())
        best.append(top2)
    assert best[0] != best[1], "the two questions point at different tokens"


def test_explain_draws_a_qwen_grid_at_the_images_own_aspect(tmp_path, capsys):
    """Qwen-VL: the merged-token grid of a portrait image (11 x 16 at 308x448 in Qwen2.5-VL)
    over the image at its own aspect; the reduction keeps K = 20 of its 176 tokens."""
    from par_vllm.demo_qwen import make_demo_qwen_model
    from par_vllm.explain import Explainer
    from par_vllm.settings import ParSettings

    model = make_demo_qwen_model(tmp_path / "qwen")
    image_path = tmp_path / "portrait.png"
    demo_image().resize((308, 448)).save(image_path)
    visual, grids = Explainer(model).features(Image.open(image_path))
    assert visual.shape[1] == 176 and grids == [(16, 11)]
    assert Explainer(model).reduce_visual(visual, "Where is the star?", ParSettings()).kept_indices.shape == (1, 20)
    # Pooling follows the 16 x 11 grid: K = 20 is 5 x 4 cells.
    pooled = Explainer(model).reduce_visual(visual, "Where is the star?", ParSettings(method="pool"), grids[0])
    assert pooled.assignment[0].reshape(16, 11)[-1, -1] == 19 and pooled.assignment[0][10] == 3
    out = tmp_path / "kept.png"
    main(["explain", str(image_path), "Where is the star?", "--model", str(model), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (462, 672)
