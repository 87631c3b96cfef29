# vLLM's official OpenAI server image (CUDA), with the PAR plugin installed.
#   docker build -t par-vllm .
#   docker run --gpus all -p 8000:8000 -e MODEL=llava-hf/llava-1.5-7b-hf par-vllm
FROM vllm/vllm-openai:v0.33.0

COPY setup.py README.md /opt/par-vllm/
COPY par_vllm /opt/par-vllm/par_vllm
COPY kernels /opt/par-vllm/kernels
# --no-deps: the image already has vllm, torch, triton, pydantic and prometheus-client;
# the word lists and segmenters are the only dependencies it lacks.
RUN python3 -m pip install --no-cache-dir stopwordsiso==0.7.1 jieba==0.42.1 tinysegmenter==0.4 \
 && python3 -m pip install --no-cache-dir --no-deps /opt/par-vllm

COPY deploy/docker-entrypoint.sh /usr/local/bin/par-vllm-entrypoint
RUN chmod +x /usr/local/bin/par-vllm-entrypoint

# PAR is on by default; each PAR_* variable sets one server default (see README). What
# clients may do is bounded by default (docs/operating.md): no media URL is fetched, at most
# 4 images and 32 MiB per request, no per-request settings.
ENV MODEL=llava-hf/llava-1.5-7b-hf \
    PAR_KEEP_RATIO=0.111 \
    PAR_TRUST_REQUEST_SETTINGS=0 \
    PAR_ALLOWED_MEDIA_DOMAINS="" \
    PAR_MAX_IMAGES_PER_REQUEST=4 \
    PAR_MAX_VIDEOS_PER_REQUEST=1 \
    PAR_MAX_REQUEST_BYTES=33554432 \
    PORT=8000

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'))"]
ENTRYPOINT ["par-vllm-entrypoint"]
