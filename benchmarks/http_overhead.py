"""What the HTTP front door costs over gRPC: TTFT and per-token time of the same greedy request,
streamed through gRPC (vlm_generate_stream) and through HTTP (OpenAI chat completions SSE, and
Ollama NDJSON), alternating, in one process and one run.

    python benchmarks/http_overhead.py [MODEL_DIR] [--runs N]

MODEL_DIR defaults to the committed tiny model, whose steps are short, so the transports' own
cost is the largest share there. Prints medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager  # noqa: E402
from lumen_vlm.fastvlm.fastvlm_service import FastVLMService  # noqa: E402
from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc  # noqa: E402
from lumen_vlm.resources.settings import (  # noqa: E402
    AdmissionSettings,
    CacheSettings,
    HttpSettings,
    ModelSettings,
    ServerSettings,
    VLMSettings,
)
from lumen_vlm.server import VLMServer  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "tiny-fastvlm"
PHOTO = ROOT / "tests" / "fixtures" / "golden" / "portrait.jpg"
QUESTION = "Describe this photo."


def grpc_run(stub: ml_service_pb2_grpc.InferenceStub, image: bytes, tokens: int) -> tuple[float, float]:
    meta = {"prompt": QUESTION, "max_new_tokens": str(tokens), "temperature": "0"}
    request = ml_service_pb2.InferRequest(
        task="vlm_generate_stream", payload=image, payload_mime="image/jpeg", meta=meta, correlation_id="b"
    )
    start = time.perf_counter()
    arrivals = [time.perf_counter() for response in stub.Infer(iter([request])) if not response.is_final]
    return arrivals[0] - start, (arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1)


def openai_run(client: httpx.Client, base: str, model: str, image: bytes, tokens: int) -> tuple[float, float]:
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "stream": True}  # fmt: skip
    start = time.perf_counter()
    arrivals = []
    with client.stream("POST", base + "/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    return arrivals[0] - start, (arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1)


def ollama_run(client: httpx.Client, base: str, model: str, image: bytes, tokens: int) -> tuple[float, float]:
    body = {"model": model, "prompt": QUESTION, "images": [base64.b64encode(image).decode()],
            "options": {"temperature": 0, "num_predict": tokens}}  # fmt: skip
    start = time.perf_counter()
    arrivals = []
    with client.stream("POST", base + "/api/generate", json=body) as reply:
        for line in reply.iter_lines():
            if line and not json.loads(line)["done"]:
                arrivals.append(time.perf_counter())
    return arrivals[0] - start, (arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=TINY)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    settings = VLMSettings(
        cache_dir=Path(tempfile.mkdtemp(prefix="lumen-bench-")),
        model=ModelSettings(alias="bench", model=str(args.model_dir)),
        admission=AdmissionSettings(max_concurrency=1),
        server=ServerSettings(host="127.0.0.1", port=0, http=HttpSettings(port=0)),
        caches=CacheSettings(feature_cache_bytes=0, prefix_cache_bytes=0),  # every request pays the same
    )
    server = VLMServer(settings)
    server.start()
    manager = FastVLMModelManager.from_settings(settings, args.model_dir)
    service = FastVLMService(manager, settings)
    server.install(service)
    assert server.http is not None
    base = f"http://127.0.0.1:{server.http.port}"
    stub = ml_service_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    image = PHOTO.read_bytes()
    runs: dict[str, list[tuple[float, float]]] = {"grpc": [], "openai": [], "ollama": []}
    with httpx.Client(timeout=120) as client:
        for index in range(args.runs + 2):  # the first two warm up
            for name, run in (
                ("grpc", lambda: grpc_run(stub, image, args.tokens)),
                ("openai", lambda: openai_run(client, base, service.model_id, image, args.tokens)),
                ("ollama", lambda: ollama_run(client, base, service.model_id, image, args.tokens)),
            ):
                measured = run()
                if index >= 2:
                    runs[name].append(measured)
    server.shutdown()
    grpc_ttft = statistics.median(r[0] for r in runs["grpc"]) * 1000
    grpc_tok = statistics.median(r[1] for r in runs["grpc"]) * 1000
    print(f"model {args.model_dir.name}, {args.runs} runs each, {args.tokens} tokens, medians")
    print("transport  TTFT ms  (vs gRPC)  per-token ms  (vs gRPC)")
    for name, measured in runs.items():
        ttft = statistics.median(r[0] for r in measured) * 1000
        tok = statistics.median(r[1] for r in measured) * 1000
        print(f"{name:9} {ttft:8.2f} {ttft - grpc_ttft:+9.2f} {tok:12.3f} {tok - grpc_tok:+10.3f}")


if __name__ == "__main__":
    main()
