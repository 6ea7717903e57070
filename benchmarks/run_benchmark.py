"""Lumen VLM against transformers on the FastVLM-0.5B architecture, side by side in one run.

    python benchmarks/run_benchmark.py                # full size (builds and caches the model once)
    python benchmarks/run_benchmark.py --quick        # tiny model: checks the benchmark works

The model is a random-weight FastVLM-0.5B built by tools/make_test_model.py (random weights
cost exactly what real ones do), with int8 and q4 decoders from tools/quantize_model.py.
Each engine runs in its own process (so its peak RSS is its own), one after another, on the
same 1024x1024 photo and a ~20-token question, greedy, ignoring EOS so every run decodes the
same number of tokens. The machine's memory read bandwidth is measured just before and after
each engine, and its decode speed is set against it (bytes of decoder weights read per token).

Medians over --runs runs after one warm-up; JSON to --json, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LUMEN_VLM_BENCH_CACHE", "~/.cache/lumen-vlm/bench")).expanduser()
QUESTION = "Describe this photo in detail: what objects, colours and people do you see?"
ENGINES = ("lumen-fp32", "lumen-int8", "lumen-q4", "transformers")


# --------------------------------------------------------------------------- inputs


def make_photo(size: int = 1024) -> bytes:
    """A deterministic 1024x1024 JPEG with some structure."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([base[None, :].repeat(size, 0), base[:, None].repeat(size, 1), np.full((size, size), 90.0)], -1)
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((300, 200, 700, 600), fill=(240, 220, 30))
    draw.rectangle((100, 750, 900, 950), fill=(20, 120, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def ensure_model(model_dir: Path, size: str) -> Path:
    """Build the random-weight model (ONNX + PyTorch weights) and its quantized decoders once."""
    marker = model_dir / ".bench-complete"
    if marker.exists():
        return model_dir
    command = [sys.executable, str(ROOT / "tools/make_test_model.py"), "--size", size, "--save-torch"]
    subprocess.run([*command, "--out", str(model_dir)], check=True)
    sys.path.insert(0, str(ROOT))
    from tools.quantize_model import quantize_decoder

    for precision in ("int8", "q4"):
        quantize_decoder(model_dir, precision)
    marker.write_text("ok\n")
    return model_dir


# --------------------------------------------------------------------------- machine


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second the machine reads from RAM, every core reading its part of one array.

    np.max over float32 is a SIMD loop that keeps up with memory (a float64 np.sum does not:
    its pairwise summation is compute-bound), so this measures the memory, not the ALU.
    """
    threads = os.cpu_count() or 1
    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.max, args=(chunk,)) for chunk in chunks]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


# --------------------------------------------------------------------------- workers


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000.0, value


def reset_peak_rss() -> None:
    """Start the VmHWM count afresh (Linux: writing 5 to clear_refs resets the peak)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). ru_maxrss is no good here: on Linux it survives
    fork+exec, so a worker would report its parent's peak (which quantized the models)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def lumen_worker(model_dir: Path, precision: str, runs: int, new_tokens: int) -> dict[str, Any]:
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest
    from lumen_vlm.fastvlm.image import image_to_pixels

    # As the server loads it: with ORT's optimized graphs saved in the cache (made on first use).
    optimized = model_dir.parent / "ort-optimized"  # beside the model: --quick's goes with its temp dir
    FastVLMModelManager.from_model_dir(model_dir, precision=precision, optimized_graph_dir=optimized).close()
    reset_peak_rss()
    load_ms, manager = timed(
        lambda: FastVLMModelManager.from_model_dir(model_dir, precision=precision, optimized_graph_dir=optimized)
    )
    backend = manager.backend
    photo = make_photo()
    messages = [{"role": "user", "content": QUESTION}]
    image_id = manager.facts.image_token_id

    def cold_run() -> dict[str, float]:
        pixels_ms, pixels = timed(lambda: image_to_pixels(photo, manager.image_spec))
        vision_ms, features = timed(lambda: backend.encode_image(pixels))
        ids = manager.prompt_ids(messages, features.shape[0], True)
        prefill_ms, state = timed(lambda: backend.prefill(ids, features, image_id, reserve=new_tokens))
        token = int(np.argmax(state.logits))
        start = time.perf_counter()
        for _ in range(new_tokens - 1):  # greedy, EOS ignored: every run decodes the same count
            token = int(np.argmax(backend.decode_step(state, token)))
        decode_s = time.perf_counter() - start
        return {
            "preprocess_ms": pixels_ms,
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "ttft_ms": pixels_ms + vision_ms + prefill_ms,
            "decode_tok_s": (new_tokens - 1) / decode_s,
            "prompt_tokens": int(ids.size),
        }

    def same_photo_ttft(question_index: int) -> float:
        """TTFT of the served path for a new question about a photo asked about before."""
        question = f"{QUESTION} (question {question_index})"
        params = GenerationParams(max_new_tokens=1)
        manager.generate_text(GenerationRequest(messages, photo, params))  # the photo's first question
        request = GenerationRequest([{"role": "user", "content": question}], photo, params)
        return manager.generate_text(request).ttft_ms

    # Cold measurements bypass the feature and prefix caches by calling the backend directly.
    cold_run()
    samples = [cold_run() for _ in range(runs)]
    repeat_ttft = [same_photo_ttft(i) for i in range(runs)]
    result = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    result.update(
        {
            "engine": f"lumen-{precision}",
            "load_ms": load_ms,
            "same_photo_ttft_ms": statistics.median(repeat_ttft),
            "decoder_bytes": backend.info.decoder_bytes,
            "model_bytes": backend.info.model_bytes,
            "providers": list(backend.info.providers),
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    return result


def transformers_worker(model_dir: Path, runs: int, new_tokens: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tools.make_test_model import import_reference_stack, reference_messages, reference_pixels

    import_reference_stack()
    import torch
    from transformers import AutoTokenizer, FastVlmForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """Times each token as generate() emits it: decode speed from one call."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

        def decode_tokens_per_second(self, new_tokens: int) -> float:
            assert len(self.times) == new_tokens + 1, "one put for the prompt, one per token"
            return (new_tokens - 1) / (self.times[-1] - self.times[1])

    torch.set_num_threads(os.cpu_count() or 1)
    load_ms, model = timed(lambda: FastVlmForConditionalGeneration.from_pretrained(str(model_dir / "torch")).eval())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    size = json.loads((model_dir / "preprocessor_config.json").read_text())["crop_size"]["height"]
    photo = make_photo()
    image_id = model.config.image_token_index

    def cold_run() -> dict[str, float]:
        pixels_ms, pixels = timed(lambda: torch.from_numpy(reference_pixels(photo, size, "pad")))
        with torch.inference_mode():
            vision_ms, features = timed(lambda: model.get_image_features(pixel_values=pixels).pooler_output)
            prompt = tokenizer.apply_chat_template(
                reference_messages([{"role": "user", "content": QUESTION}]), tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            expanded = [t for token in ids for t in ([token] * features.shape[1] if token == image_id else [token])]
            input_ids = torch.tensor([expanded])
            kwargs = {"input_ids": input_ids, "pixel_values": pixels, "do_sample": False, "pad_token_id": 0}
            ttft_ms, _ = timed(lambda: model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1))
            embeds = model.get_input_embeddings()(input_ids)
            embeds[input_ids == image_id] = features.reshape(-1, embeds.shape[-1])
            prefill_ms, _ = timed(lambda: model(inputs_embeds=embeds, logits_to_keep=1))
            clock = TokenClock()
            model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
        return {
            "preprocess_ms": pixels_ms,
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "ttft_ms": pixels_ms + ttft_ms,
            "decode_tok_s": clock.decode_tokens_per_second(new_tokens),
            "prompt_tokens": len(expanded),
        }

    cold_run()
    samples = [cold_run() for _ in range(runs)]
    result = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    decoder = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if "vision_tower" not in n and "projector" not in n
    )
    result.update(
        {
            "engine": "transformers",
            "load_ms": load_ms,
            "same_photo_ttft_ms": None,
            "decoder_bytes": decoder,
            "model_bytes": weights,
            "providers": [f"torch {torch.__version__} ({torch.get_num_threads()} threads)"],
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    return result


def run_worker(engine: str, model_dir: Path, runs: int, new_tokens: int) -> dict[str, Any]:
    """Run one engine in a fresh process and return its measurements."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    command = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--model-dir",
        str(model_dir),
        "--runs",
        str(runs),
        "--new-tokens",
        str(new_tokens),
        "--json",
        str(out_path),
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads(out_path.read_text())
    out_path.unlink()
    return result


# --------------------------------------------------------------------------- report


def run_beside_bandwidth(engine: str, model_dir: Path, runs: int, new_tokens: int, gib: float) -> dict[str, Any]:
    """One engine's measurements, with the machine's memory read bandwidth measured just
    before and just after it (the better of the two): on a shared machine the bandwidth
    moves with the neighbours, so a single probe at the start of a long run is no ceiling
    for an engine measured minutes later."""
    before = memory_read_bandwidth(gib)
    result = run_worker(engine, model_dir, runs, new_tokens)
    result["memory_read_gb_s"] = max(before, memory_read_bandwidth(gib)) / 1e9
    return result


def add_bandwidth(results: list[dict[str, Any]]) -> None:
    """Decoder bytes read per token x tokens/s, as a fraction of the RAM bandwidth measured
    beside each engine."""
    for result in results:
        bandwidth = result["memory_read_gb_s"] * 1e9
        achieved = result["decoder_bytes"] * result["decode_tok_s"]
        result["achieved_gb_s"] = achieved / 1e9
        result["bandwidth_fraction"] = achieved / bandwidth
        result["decode_ceiling_tok_s"] = bandwidth / result["decoder_bytes"]


def markdown_table(results: list[dict[str, Any]]) -> str:
    reference = next((r for r in results if r["engine"] == "transformers"), None)
    header = (
        "| engine | load s | vision ms | prefill ms | TTFT ms | same photo TTFT ms | decode tok/s "
        "| decode vs transformers | TTFT vs transformers | bandwidth used | peak RSS MB | model MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        decode_ratio = f"{r['decode_tok_s'] / reference['decode_tok_s']:.2f}x" if reference else "-"
        ttft_ratio = f"{r['ttft_ms'] / reference['ttft_ms']:.2f}x" if reference else "-"
        same = f"{r['same_photo_ttft_ms']:.0f}" if r.get("same_photo_ttft_ms") is not None else "-"
        lines.append(
            f"| {r['engine']} | {r['load_ms'] / 1000:.1f} | {r['vision_ms']:.0f} | {r['prefill_ms']:.0f} "
            f"| {r['ttft_ms']:.0f} | {same} | {r['decode_tok_s']:.1f} | {decode_ratio} | {ttft_ratio} "
            f"| {r['bandwidth_fraction'] * 100:.0f}% of {r['decode_ceiling_tok_s']:.1f} tok/s "
            f"({r['memory_read_gb_s']:.1f} GB/s) "
            f"| {r['peak_rss_mb']:.0f} | {r['model_bytes'] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """The performance targets as table rows: what each asks, this run's value, met or not."""
    engines = {r["engine"]: r for r in results}
    fp32, q4, ref = engines.get("lumen-fp32"), engines.get("lumen-q4"), engines.get("transformers")
    if not (fp32 and q4 and ref):
        return []
    fp32_speedup = fp32["decode_tok_s"] / ref["decode_tok_s"]
    q4_speedup = q4["decode_tok_s"] / ref["decode_tok_s"]
    ttft_ratio = fp32["ttft_ms"] / ref["ttft_ms"]
    repeat_ratio = fp32["same_photo_ttft_ms"] / fp32["ttft_ms"]
    checks = [
        (
            "fp32 decode >= 90% of the bandwidth ceiling",
            f"{fp32['bandwidth_fraction']:.0%}",
            fp32["bandwidth_fraction"] >= 0.9,
        ),
        ("fp32 decode >= 2x transformers", f"{fp32_speedup:.2f}x", fp32_speedup >= 2.0),
        ("q4 decode >= 8x transformers", f"{q4_speedup:.2f}x", q4_speedup >= 8.0),
        ("TTFT, new photo (fp32) <= 0.6x transformers", f"{ttft_ratio:.2f}x", ttft_ratio <= 0.6),
        ("same photo, new question: TTFT <= 25% of the first", f"{repeat_ratio:.0%}", repeat_ratio <= 0.25),
    ]
    for r in (fp32, engines.get("lumen-int8"), q4):
        if r:
            ratio = r["peak_rss_mb"] * 1e6 / r["model_bytes"]
            checks.append((f"{r['engine']} peak RSS <= model files + 25%", f"{ratio:.2f}x the files", ratio <= 1.25))
    return [f"| {name} | {value} | {'met' if met else 'not met'} |" for name, value, met in checks]


def report_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    bandwidths = [r["memory_read_gb_s"] for r in report["results"]]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} cores, {machine['memory_gib']} GiB; "
        f"Python {machine['python']}, onnxruntime {machine['onnxruntime']}. "
        "Memory read bandwidth, measured just before and after each engine: "
        f"{min(bandwidths):.1f} to {max(bandwidths):.1f} GB/s.",
        "",
        f"Model: random-weight FastVLM-0.5B ({report['size']}), one 1024x1024 photo, a ~20-token question, "
        f"{report['new_tokens']} new tokens (greedy, EOS ignored); medians of {report['runs']} runs after a "
        "warm-up; every engine in its own process, one after another, same threads.",
        "",
        markdown_table(report["results"]),
        "",
    ]
    targets = target_lines(report["results"])
    if targets:
        lines += ["| target | this run | |", "|---|---|---|", *targets, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 run: a smoke test, not a measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, help="use (and cache) the model here")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the report here (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.worker == "transformers":
            result = transformers_worker(args.model_dir, args.runs, args.new_tokens)
        else:
            result = lumen_worker(args.model_dir, args.worker.split("-", 1)[1], args.runs, args.new_tokens)
        args.json.write_text(json.dumps(result))
        return 0

    size = "tiny" if args.quick else "full"
    runs = 1 if args.quick else args.runs
    new_tokens = 8 if args.quick else args.new_tokens
    temporary = None
    if args.model_dir is None and args.quick:
        temporary = Path(tempfile.mkdtemp(prefix="lumen-vlm-bench-"))
        model_dir = temporary / "tiny"
    else:
        model_dir = (args.model_dir or CACHE / "fastvlm-0.5b-random").expanduser()
    try:
        ensure_model(model_dir, size)
        gib = 0.25 if args.quick else 1.0
        results = [run_beside_bandwidth(engine, model_dir, runs, new_tokens, gib) for engine in args.engines]
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    add_bandwidth(results)
    report = {
        "machine": machine_description(),
        "memory_read_gb_s": max(r["memory_read_gb_s"] for r in results),
        "size": size,
        "runs": runs,
        "new_tokens": new_tokens,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    text = report_markdown(report)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
