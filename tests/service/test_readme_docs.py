"""The README tells the truth: its client example runs, its result example has the keys a real
result has, and its links lead to files inside the repository."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ..conftest import GOLDEN
from .conftest import CALL_TIMEOUT, Served, image_bytes, make_request, result_of

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def client_example() -> str:
    (block,) = [b for b in readme_blocks("python") if "grpc.insecure_channel(" in b and 'task="vlm_generate"' in b]
    return block


def structured_output_example() -> str:
    (block,) = [b for b in readme_blocks("python") if '"response_format"' in b]
    return block


def key_tree(value: Any) -> Any:
    """A JSON document's keys, nested, without its values."""
    if isinstance(value, dict):
        return {key: key_tree(item) for key, item in value.items()}
    return None


def test_the_client_example_runs_against_a_server(served: Served, tmp_path: Path) -> None:
    image = tmp_path / "image.jpg"
    image.write_bytes((GOLDEN / "portrait.jpg").read_bytes())
    source = client_example().replace("localhost:50051", f"127.0.0.1:{served.port}")
    source = source.replace("'image.jpg'", repr(str(image)))
    namespace: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            exec(compile(source, "README.md", "exec"), namespace)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CALL_TIMEOUT)
    assert not thread.is_alive(), "the README's client example did not finish"
    assert not errors, errors
    assert isinstance(namespace["result"]["text"], str)


def test_the_structured_output_example_gives_labels_valid_against_its_schema(served: Served, tmp_path: Path) -> None:
    """It runs after the client example, in its namespace (the channel, the stub, the photo)."""
    image = tmp_path / "image.jpg"
    image.write_bytes((GOLDEN / "portrait.jpg").read_bytes())
    source = client_example().replace("localhost:50051", f"127.0.0.1:{served.port}")
    source = source.replace("'image.jpg'", repr(str(image))) + structured_output_example()
    namespace: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    jsonschema.validate(namespace["answer"], namespace["labels"])


def test_the_client_example_raises_on_an_error_response(served: Served, tmp_path: Path) -> None:
    image = tmp_path / "image.jpg"
    image.write_bytes(b"not an image at all")
    source = client_example().replace("localhost:50051", f"127.0.0.1:{served.port}")
    source = source.replace("'image.jpg'", repr(str(image)))
    with pytest.raises(RuntimeError, match="unsupported image format"):
        exec(compile(source, "README.md", "exec"), {})


def test_the_result_example_has_the_keys_of_a_real_result(served: Served) -> None:
    (example,) = [json.loads(block) for block in readme_blocks("json") if '"finish_reason"' in block]
    request = make_request(image=image_bytes(), prompt="Describe this photo.", max_new_tokens="4", temperature="0.7")
    (response,) = list(served.stub.Infer(iter([request]), timeout=CALL_TIMEOUT))
    assert key_tree(example) == key_tree(result_of(response))


def test_links_lead_to_files_in_the_repository() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    local = [link for link in links if "://" not in link]
    assert local, "the README links to no file; this test would check nothing"
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT), f"{link} points outside the repository"
        assert target.exists(), f"{link} does not exist"


def test_seed_and_streaming_chunks_appear_where_the_readme_says(served: Served) -> None:
    greedy = make_request(image=image_bytes(), prompt="Describe this photo.", max_new_tokens="4", temperature="0")
    (response,) = list(served.stub.Infer(iter([greedy]), timeout=CALL_TIMEOUT))
    assert {"seed", "streaming_chunks"}.isdisjoint(result_of(response)["metadata"])

    stream = make_request("vlm_generate_stream", image=image_bytes(), max_new_tokens="4", temperature="0")
    responses = list(served.stub.Infer(iter([stream]), timeout=CALL_TIMEOUT))
    metadata = result_of(responses[-1])["metadata"]
    assert metadata["streaming_chunks"] == len(responses) - 1
    assert "seed" not in metadata


def test_ci_runs_the_readmes_test_commands() -> None:
    """CI installs and tests exactly as the README tells a new contributor to."""
    text = README.read_text(encoding="utf-8")
    (command,) = re.findall(r"Install and run the tests:\n\n```bash\n(.*?)\n```", text)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    for step in command.split(" && "):
        assert step in ci_lines, f"{step!r} is in the README but not in .ci/run"
