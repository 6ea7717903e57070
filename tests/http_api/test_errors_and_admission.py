"""Bad input in each API's own error shape; the key; the one admission both transports share;
the metrics of both; the page in a real browser."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from lumen_vlm.proto import ml_service_pb2

from ..service.conftest import CALL_TIMEOUT, ThrottledManager, good_request, image_bytes, infer, long_stream, wait_until
from .conftest import Both

PNG = base64.b64encode(image_bytes()).decode()


def ollama_post(both: Both, body: Any, path: str = "/api/generate", **kwargs: Any) -> httpx.Response:
    return httpx.post(both.base + path, json=body, timeout=60, **kwargs)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"prompt": "hi"}, 400, "model is required"),
        ({"model": "x", "prompt": "hi"}, 404, 'model "x" not found'),
        ({"prompt": "hi", "images": [PNG, PNG]}, 400, "one image per request"),
        ({"prompt": "hi", "images": ["not base64!"]}, 400, "not valid base64"),
        ({"prompt": "hi", "images": ["http://169.254.169.254/x.png"]}, 400, "allowed_image_hosts"),
        ({"prompt": "hi", "options": {"temperature": 3}}, 400, "'options.temperature' must be in"),
        ({"prompt": "hi", "options": {"temperature": "hot"}}, 400, "options.temperature"),
        ({"prompt": "hi", "think": True}, 400, "does not support thinking"),
        ({"prompt": "hi", "raw": True}, 400, "raw prompts are not supported"),
        ({"prompt": "hi", "format": {"type": "nonsense"}}, 400, "response_format"),
        ({"prompt": "hi", "images": [base64.b64encode(b"GIF89a" + bytes(40)).decode()]}, 400, "image"),
    ],
)
def test_ollama_bad_input(both: Both, body: dict[str, Any], status: int, says: str) -> None:
    if "model" not in body and body != {"prompt": "hi"}:  # every case but the one about the missing model
        body = {"model": both.service.model_id, **body}
    reply = ollama_post(both, body)
    assert reply.status_code == status, reply.text
    assert says in reply.json()["error"]
    assert (
        ollama_post(
            both, {"model": both.service.model_id, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        (
            {
                "model": "M",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
                ],
            },
            400,
            "not supported",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
            400,
            "'max_tokens' must be in",
        ),
        (
            {"model": "M", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1},
            400,
            "presence_penalty",
        ),
    ],
)
def test_openai_bad_input(both: Both, body: dict[str, Any], status: int, says: str) -> None:
    if body.get("model") == "M":
        body = body | {"model": both.service.model_id}
    reply = httpx.post(both.base + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"] and {"message", "type", "param", "code"} <= set(error)


def test_bodies_are_bounded_and_must_be_json(start: Any) -> None:
    both = start(max_payload_bytes=64 * 1024)
    too_big = httpx.post(both.base + "/api/generate", content=b"{" + b" " * (2 << 20) + b"}", timeout=60)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    broken = httpx.post(both.base + "/v1/chat/completions", content=b"{not json", timeout=60)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_api_key_guards_http_and_grpc_but_not_health(start: Any) -> None:
    both = start(api_key="s3cret")
    assert httpx.get(both.base + "/api/tags").status_code == 401
    assert httpx.get(both.base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(both.base + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(both.base + "/").status_code == 200 and httpx.get(both.base + "/health").status_code == 200
    with pytest.raises(grpc.RpcError) as refused:
        infer(both, [good_request()])  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answered = list(
        both.stub.Infer(iter([good_request()]), timeout=CALL_TIMEOUT, metadata=[("authorization", "Bearer s3cret")])
    )
    assert answered[-1].is_final and not answered[-1].HasField("error")


def test_one_admission_for_both_transports(start: Any, manager: Any) -> None:
    """A queue filled over gRPC refuses HTTP at once, each API in its own words, and a queue filled
    over HTTP refuses gRPC."""
    held = ThrottledManager(manager, step_s=CALL_TIMEOUT)
    both = start(held, max_concurrency=1, max_queue=0)
    call = both.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    assert wait_until(lambda: both.service.engine.active == 1)
    body = {"model": both.service.model_id, "prompt": "hi", "stream": False}
    ollama = httpx.post(both.base + "/api/generate", json=body, timeout=10)
    assert ollama.status_code == 503 and "server busy" in ollama.json()["error"] and ollama.headers["retry-after"]
    chat = {"model": both.service.model_id, "messages": [{"role": "user", "content": "hi"}]}
    openai = httpx.post(both.base + "/v1/chat/completions", json=chat, timeout=10)
    assert openai.status_code == 429 and openai.headers["retry-after"]
    held.release()
    list(call)
    held.step_s = CALL_TIMEOUT
    held._released.clear()
    with (
        httpx.Client(timeout=CALL_TIMEOUT) as client,
        client.stream("POST", both.base + "/api/generate", json=body | {"stream": True}) as streaming,
    ):
        assert wait_until(lambda: both.service.engine.active == 1)
        (refused,) = infer(both, [good_request()])  # type: ignore[arg-type]
        assert refused.error.code == ml_service_pb2.ErrorCode.ERROR_CODE_UNAVAILABLE
        held.release()
        assert streaming.status_code == 200


def test_metrics_count_both_transports(both: Both) -> None:
    infer(both, [good_request()])  # type: ignore[arg-type]
    ollama_post(both, {"model": both.service.model_id, "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
    ollama_post(both, {"model": both.service.model_id, "prompt": "hi", "options": {"temperature": 9}})
    text = httpx.get(both.base + "/metrics").text
    assert 'lumen_vlm_requests_total{outcome="ok",task="vlm_generate",transport="grpc"}' in text
    assert 'lumen_vlm_requests_total{outcome="ok",task="ollama.generate",transport="http"}' in text
    assert 'lumen_vlm_requests_total{outcome="invalid_request",task="ollama.generate",transport="http"}' in text
    for name in ("queue_depth", "running_batch_size", "kv_cache_tokens_used", "model_load_seconds",
                 "image_feature_cache_hits_total", "prefix_cache_hits_total", "time_to_first_token_seconds_bucket",
                 "inter_token_seconds_bucket", "prompt_tokens_total", "generation_tokens_total"):  # fmt: skip
        assert f"lumen_vlm_{name}" in text, name


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def test_the_page_streams_an_answer_in_a_real_browser(both: Both, golden: dict[str, Any], tmp_path: Path) -> None:
    """Debian's Chromium, driven by Playwright (no browser downloaded): a photo, a question, the
    streamed answer equal to the API's. CI installs chromium and sets LUMEN_VLM_REQUIRE_BROWSER."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("LUMEN_VLM_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium")
        pytest.skip("no Chromium (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    case = next(c for c in golden["cases"] if c["name"] == "crop_mode")
    photo = tmp_path / "portrait.jpg"
    photo.write_bytes(case["image_bytes"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(both.base + "/")
        page.wait_for_selector(f"#model:has-text('{both.service.model_id}')")
        page.set_input_files("#image", str(photo))
        page.fill("#question", case["messages"][0]["content"])
        page.fill("#max-tokens", str(case["max_new_tokens"]))
        page.click("#ask")
        page.wait_for_selector("#answer[data-state=done]", timeout=60_000)
        answer = page.text_content("#answer")
        ttft, tps = page.text_content("#ttft"), page.text_content("#tps")
        browser.close()
    assert answer == case["text"]
    assert ttft and "ms" in ttft and tps


def test_image_urls_are_fetched_only_from_allowed_hosts(manager: Any, tiny_model_dir: Path) -> None:
    """A loopback server holds the photo: fetched when its host is allowed, refused otherwise."""
    import http.server
    import threading
    from dataclasses import replace

    from .conftest import start_both

    photo = image_bytes()

    class Photo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(photo)

        def log_message(self, *args: Any) -> None:
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Photo)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/photo.png"
    both = start_both(manager, tiny_model_dir)
    try:
        message = {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}],
        }
        body = {"model": both.service.model_id, "messages": [message], "max_tokens": 2}
        refused = httpx.post(both.base + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400 and "allowed_image_hosts" in refused.json()["error"]["message"]
        assert both.server.http is not None
        both.server.http.served.http = replace(both.server.http.served.http, allowed_image_hosts=("127.0.0.1",))
        fetched = httpx.post(both.base + "/v1/chat/completions", json=body, timeout=60)
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["usage"]["prompt_tokens"] > 16  # the image's tokens are in the prompt
    finally:
        both.stop()
        images.shutdown()
