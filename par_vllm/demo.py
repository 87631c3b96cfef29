"""The README's main job: serve the demo model with PAR and compare one request with and
without it, through vLLM's OpenAI-compatible API and the official `openai` client."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageDraw

QUESTION = "What color is the triangle?"


def demo_image(size: int = 336) -> Image.Image:
    """Three coloured shapes on grey: the question is about one of them."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    s = size // 6
    draw.polygon([(s, 3 * s), (2 * s, s), (3 * s, 3 * s)], fill=(220, 30, 30))
    draw.ellipse([3.5 * s, 0.8 * s, 5.3 * s, 2.6 * s], fill=(30, 60, 220))
    draw.rectangle([2 * s, 3.8 * s, 4 * s, 5.4 * s], fill=(240, 210, 20))
    return image


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def video_data_url(frames, fps: float = 2.0) -> str:
    """An MP4 clip of `frames` (T x H x W x 3 RGB uint8; none makes an empty clip) as a data URL."""
    import tempfile

    import cv2

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        height, width = frames.shape[1:3]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for picture in frames:
            writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        writer.release()
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_messages(question: str, image: Image.Image) -> list[dict]:
    return [{
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": question},
        ],
    }]


def run_demo(model_dir: Path, keep_ratio: float = 0.111, max_tokens: int = 16) -> list[dict]:
    from .server import CPU_ENGINE_ARGS, VllmServer, par_overrides

    server = VllmServer(
        model_dir,
        hf_overrides=par_overrides(keep_ratio=keep_ratio),
        # Per-request PAR settings need --trust-request-mm-kwargs (vLLM refuses them otherwise).
        extra_args=[*CPU_ENGINE_ARGS, "--trust-request-mm-kwargs", "--enable-prompt-tokens-details"],
    )
    print(f"Starting vLLM with PAR (par_keep_ratio={keep_ratio}) on {server.base_url} ...", flush=True)
    rows = []
    with server:
        client = server.client()
        for label, extra in [("with PAR", {}),
                             ("without PAR", {"mm_processor_kwargs": {"par_enabled": False}})]:
            response = client.chat.completions.create(
                model="par-demo",
                messages=chat_messages(QUESTION, demo_image()),
                max_tokens=max_tokens,
                temperature=0.0,
                extra_body=extra,
            )
            details = response.usage.prompt_tokens_details
            rows.append({
                "run": label,
                "prompt_tokens": response.usage.prompt_tokens,
                "image_tokens": (getattr(details, "multimodal_tokens", None) or {}).get("image"),
                "answer": response.choices[0].message.content,
            })
    print(f"\nQ: {QUESTION}  (random-weight demo model: the answers are noise, the counts are real)")
    print(f"{'run':<12} {'prompt_tokens':>13} {'image_tokens':>12}  answer")
    for row in rows:
        print(f"{row['run']:<12} {row['prompt_tokens']:>13} {row['image_tokens']!s:>12}  {row['answer']!r}")
    return rows
