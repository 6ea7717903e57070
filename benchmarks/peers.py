"""Lumen VLM's decoder beside llama.cpp and onnxruntime-genai, class by class, in one run.

    pip install -e ".[cpu,tools,bench]"     # [bench] compiles llama.cpp (llama-cpp-python): minutes
    python benchmarks/run_benchmark.py --peers [--rounds 5] [--json FILE]

Neither peer runs FastVLM's vision tower, so this sets decoder against decoder: FastVLM-0.5B's
Qwen2-0.5B with the full-size benchmark model's random weights (run_benchmark.py builds them),
run by
  lumen-fp32/-int8/-q4      our decoder graphs, through FastVLMModelManager as the server runs them;
  genai-fp32/-int8/-int4    onnxruntime-genai, on what its model builder makes of a Hugging Face
                            Qwen2 directory written from the same weights;
  llama-F16/-Q8_0/-Q4_0     llama.cpp through llama-cpp-python, on a GGUF written from the same
                            weights with the gguf package and converted by llama.cpp's own
                            quantizer; flash attention off (-fa0) and on (-fa1).
Every engine prefills the same PROMPT_TOKENS token ids in one batch (the depth of a 1024 px
photo's prompt: 256 image tokens and 36 of text), then decodes DECODE_STEPS fixed tokens after
them (teacher-forced, so every engine does the same work and their logits can be compared), on
THREADS threads. Each engine is its own process, loaded once; the engines take turns, round
after round, in a rotating order, and ratios are taken within a round.

Accuracy: each engine's logits at the prompt's last position and after every decoded token
are set against lumen-fp32's: the largest |difference|, and how often the top-1 token agrees.
Identical weights give ~1e-4 between the fp32 engines. Random weights make top-1 fragile (the
logits are close together), so the quantized classes' agreement here is a floor, not what a
trained model shows.

Nothing here is asserted: it prints a markdown report, and JSON with --json. llama.cpp on a
CPU with AMX can crash in its AMX matmul (llama.cpp #20824): install the [bench] extra there
with CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF".
"""

from __future__ import annotations

import ctypes
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 292
DECODE_STEPS = 63
THREADS = 2
# Between two engines' turns: an engine's idle threads spin for a while after its last call
# (OpenMP's in llama.cpp, ONNX Runtime's pool), which would slow the next engine's prefill.
SETTLE_S = 1.0
SEED = 0
# Each engine's files by weight class (the keys of CLASSES). llama_ftype: LLAMA_FTYPE_MOSTLY_*.
LUMEN_PRECISIONS = {"fp32": "fp32", "int8": "int8", "q4": "q4"}
GENAI_PRECISIONS = {"fp32": "fp32", "int8": "int8", "int4": "q4"}
LLAMA_FILE_TYPES = {"F16": (1, "fp32"), "Q8_0": (7, "int8"), "Q4_0": (2, "q4")}
# The classes the comparison is made in: (lumen engine, its peers). llama.cpp's F16 has half
# fp32's bytes, so it is set beside fp32 and read as the class above it, not as its equal.
CLASSES = {
    "fp32": ("lumen-fp32", ("genai-fp32", "llama-F16")),
    "int8": ("lumen-int8", ("genai-int8", "llama-Q8_0")),
    "q4": ("lumen-q4", ("genai-int4", "llama-Q4_0")),
}
REFERENCE = "lumen-fp32"


@dataclass(frozen=True)
class Candidate:
    """Another quantization of our decoder, run as one more engine beside ours and the peers:
    tools/quantize_model.quantize_q4's keywords, or an int8 form for quantize_int8."""

    name: str
    weight_class: str
    options: dict[str, Any]


CANDIDATES = (
    # lumen-q4 is tools/quantize_model's default (block 128, zero points); these are the others.
    Candidate("lumen-q4-b32-sym", "q4", {"block_size": 32, "is_symmetric": True}),  # the default until 2026-12-03
    Candidate("lumen-q4-b64", "q4", {"block_size": 64}),
    Candidate("lumen-q4-b128-sym", "q4", {"block_size": 128, "is_symmetric": True}),
    # lumen-int8 is the tool's int8 form for this CPU (--int8-form auto); these are both forms.
    Candidate("lumen-int8-integer", "int8", {"int8_form": "integer"}),  # MatMulInteger
    Candidate("lumen-int8-nbits", "int8", {"int8_form": "nbits"}),  # 8-bit MatMulNBits
)
# Our decoders with prompts through another of the model's decoders (prefill_precision): name ->
# (weight class, the decoder's precision, the prompts' precision).
PREFILL_ENGINES = {"lumen-q4-prefill-int8": ("q4", "q4", "int8")}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the peers' files


def import_reference_stack() -> None:
    """torch and transformers, as tools/make_test_model.py imports them on a CPU-only torch."""
    sys.path.insert(0, str(ROOT))
    from tools.make_test_model import import_reference_stack as imported

    imported()


def write_qwen2_dir(model_dir: Path, out: Path) -> Path:
    """The FastVLM's language model alone, as a Hugging Face Qwen2ForCausalLM directory (what
    both peers' converters read): its config, its weights, and the model's tokenizer."""
    if (out / "config.json").exists():
        return out
    import_reference_stack()
    from transformers import FastVlmForConditionalGeneration, Qwen2ForCausalLM

    vlm = FastVlmForConditionalGeneration.from_pretrained(str(model_dir / "torch")).eval()
    text_config = vlm.config.text_config
    text_config.architectures = ["Qwen2ForCausalLM"]
    qwen = Qwen2ForCausalLM(text_config).eval()
    qwen.model.load_state_dict(vlm.model.language_model.state_dict())
    qwen.lm_head.load_state_dict(vlm.lm_head.state_dict())
    qwen.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def build_genai_model(qwen_dir: Path, out: Path, precision: str) -> Path:
    """onnxruntime-genai's model builder on the Qwen2 directory, for the CPU, with THREADS."""
    config_path = out / "genai_config.json"
    if not config_path.exists():
        import runpy

        import_reference_stack()  # the builder imports transformers, which imports torchvision
        saved = sys.argv
        sys.argv = ["builder", "-i", str(qwen_dir), "-o", str(out), "-p", precision, "-e", "cpu"]
        sys.argv += ["-c", str(out / "cache")]
        try:
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
        finally:
            sys.argv = saved
        shutil.rmtree(out / "cache", ignore_errors=True)
    config = json.loads(config_path.read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = THREADS
    config_path.write_text(json.dumps(config, indent=2))
    return out


def write_gguf_f32(qwen_dir: Path, path: Path) -> Path:
    """The Qwen2 directory as an all-float32 GGUF, llama.cpp's quantizer's source. Tensor and
    key names come from the gguf package's own tables for the qwen2 architecture."""
    if path.exists():
        return path
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((qwen_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_bpe_vocab(writer, qwen_dir, config["vocab_size"])
    for name, array in sorted(load_file(str(qwen_dir / "model.safetensors")).items()):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_bpe_vocab(writer: Any, qwen_dir: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads a byte-level BPE: every id up to the model's vocab size
    (ids no token has are unused padding), the merges, and the special tokens."""
    import gguf

    tokenizer = json.loads((qwen_dir / "tokenizer.json").read_text())
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special = {added["id"]: added["content"] for added in tokenizer["added_tokens"]}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in special:
            tokens.append(special[index])
            types.append(gguf.TokenType.CONTROL)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {content: index for index, content in special.items()}
    writer.add_eos_token_id(ids.get("<|im_end|>", ids.get("<|endoftext|>", 0)))
    writer.add_bos_token_id(ids.get("<|endoftext|>", 0))
    writer.add_add_bos_token(False)


def quantize_gguf(source: Path, target: Path, file_type: str) -> Path:
    """llama.cpp's own quantizer (llama-quantize's), through llama-cpp-python."""
    if target.exists():
        return target
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FILE_TYPES[file_type][0]
    params.nthread = THREADS
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {file_type} failed ({status})")
    return target


def candidate_dir(model_dir: Path, work: Path, candidate: Candidate) -> Path:
    """A model directory whose q4 decoder is the candidate's; every other file links to the model's."""
    out = work / candidate.name
    target = out / "onnx" / "decoder_model_merged_q4.onnx"
    recipe = out / "candidate.json"  # what made the file: a changed recipe makes it again
    wanted = json.dumps(candidate.options, sort_keys=True)
    if target.exists() and recipe.exists() and recipe.read_text() == wanted:
        return out
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for item in [*model_dir.iterdir(), *(model_dir / "onnx").iterdir()]:
        link = out / item.relative_to(model_dir)
        if item.name not in ("onnx", "torch") and "_q4" not in item.name and not link.exists():
            link.symlink_to(item.resolve())
    sys.path.insert(0, str(ROOT))
    from tools.quantize_model import quantize_int8, quantize_q4

    progress(f"quantizing {candidate.name}")
    source = model_dir / "onnx" / "decoder_model_merged.onnx"
    if "int8_form" in candidate.options:
        quantize_int8(source, target, form=candidate.options["int8_form"])
    else:
        quantize_q4(source, target, **candidate.options)
    recipe.write_text(wanted)
    return out


@dataclass(frozen=True)
class EngineSpec:
    name: str
    kind: str  # lumen, genai or llama
    weight_class: str  # a key of CLASSES
    path: Path
    option: str = ""  # lumen: precision; llama: "fa0"/"fa1"
    prefill_precision: str | None = None  # lumen: the prompts' decoder, where another


def prepare_engines(model_dir: Path, work: Path) -> list[EngineSpec]:
    """Every engine's files, built once under `work` and reused by later runs."""
    specs = [EngineSpec(f"lumen-{p}", "lumen", c, model_dir, p) for p, c in LUMEN_PRECISIONS.items()]
    for candidate in CANDIDATES:
        path = candidate_dir(model_dir, work, candidate)
        specs.append(EngineSpec(candidate.name, "lumen", candidate.weight_class, path, "q4"))
    for name, (weight_class, precision, prefill) in PREFILL_ENGINES.items():
        specs.append(EngineSpec(name, "lumen", weight_class, model_dir, precision, prefill))
    qwen_dir = write_qwen2_dir(model_dir, work / "qwen2")
    for precision, weight_class in GENAI_PRECISIONS.items():
        progress(f"onnxruntime-genai's builder: {precision}")
        path = build_genai_model(qwen_dir, work / f"genai-{precision}", precision)
        specs.append(EngineSpec(f"genai-{precision}", "genai", weight_class, path))
    source = write_gguf_f32(qwen_dir, work / "qwen2-f32.gguf")
    for file_type, (_, weight_class) in LLAMA_FILE_TYPES.items():
        progress(f"llama.cpp's quantizer: {file_type}")
        path = quantize_gguf(source, work / f"qwen2-{file_type}.gguf", file_type)
        specs += [EngineSpec(f"llama-{file_type}-fa{fa}", "llama", weight_class, path, f"fa{fa}") for fa in (0, 1)]
    return specs


# --------------------------------------------------------------------------- the engines


def workload(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompt's ids and the decoded ids: ordinary tokens (below the special ones), seeded."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, vocab, size=PROMPT_TOKENS + DECODE_STEPS)
    return ids[:PROMPT_TOKENS].astype(np.int64), ids[PROMPT_TOKENS:].astype(np.int64)


Runner = Callable[[np.ndarray, np.ndarray], Iterator[np.ndarray]]


def lumen_runner(spec: EngineSpec) -> Runner:
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, PreparedRequest

    optimized = spec.path.parent / "ort-optimized"
    manager = FastVLMModelManager.from_model_dir(
        spec.path,
        precision=spec.option,
        prefill_precision=spec.prefill_precision,
        intra_op_threads=THREADS,
        optimized_graph_dir=optimized,
    )

    def run(prompt: np.ndarray, steps: np.ndarray) -> Iterator[np.ndarray]:
        cache = manager.new_kv_cache(1, prompt.size + steps.size + 1)
        prepared = PreparedRequest(prompt, None, int(steps.size), time.perf_counter())
        *_, logits = manager.prefill(prepared, cache, 0, prompt.size)  # one chunk, as the peers do
        yield logits
        for token in steps:
            yield manager.decode(cache, [0], [int(token)])[0]

    return run


def genai_runner(spec: EngineSpec) -> Runner:
    import onnxruntime_genai as og

    model = og.Model(str(spec.path))

    def run(prompt: np.ndarray, steps: np.ndarray) -> Iterator[np.ndarray]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.size + steps.size + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt.astype(np.int32))
        yield generator.get_logits().reshape(-1)
        for token in steps:
            generator.append_tokens(np.array([token], dtype=np.int32))
            yield generator.get_logits().reshape(-1)

    return run


def llama_runner(spec: EngineSpec) -> Runner:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(spec.path),
        n_ctx=PROMPT_TOKENS + DECODE_STEPS + 16,
        n_batch=512,
        n_ubatch=512,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        flash_attn=spec.option == "fa1",
        verbose=False,
    )
    vocab = llm.n_vocab()

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,)).copy()

    def run(prompt: np.ndarray, steps: np.ndarray) -> Iterator[np.ndarray]:
        llm.reset()
        llm.eval(prompt.tolist())
        yield logits()
        for token in steps:
            llm.eval([int(token)])
            yield logits()

    return run


RUNNERS = {"lumen": lumen_runner, "genai": genai_runner, "llama": llama_runner}


def serve(spec: EngineSpec, connection: Connection) -> None:
    """One engine's process: load, then one timed run per request from the parent."""
    started = time.perf_counter()
    run = RUNNERS[spec.kind](spec)
    connection.send({"load_ms": (time.perf_counter() - started) * 1000.0})
    while (message := connection.recv()) is not None:
        prompt, steps, keep_logits = message
        times, rows = [], []
        clock = time.perf_counter()
        for logits in run(prompt, steps):
            now = time.perf_counter()
            times.append((now - clock) * 1000.0)
            if keep_logits:
                rows.append(np.asarray(logits, dtype=np.float32))
            clock = time.perf_counter()
        connection.send(
            {
                "prefill_ms": times[0],
                "step_ms": statistics.median(times[1:]),
                "logits": np.stack(rows) if keep_logits else None,
            }
        )


class Worker:
    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=serve, args=(spec, child), name=spec.name, daemon=True)
        self._process.start()
        self.load_ms = self._connection.recv()["load_ms"]

    def run(self, prompt: np.ndarray, steps: np.ndarray, keep_logits: bool) -> dict[str, Any]:
        self._connection.send((prompt, steps, keep_logits))
        return self._connection.recv()

    def close(self) -> None:
        self._connection.send(None)
        self._process.join(timeout=60)


# --------------------------------------------------------------------------- the run


def accuracy(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def file_bytes(spec: EngineSpec) -> int:
    """The decoder's files (ours with prompts through another decoder: both)."""
    if spec.kind == "llama":
        return spec.path.stat().st_size
    if spec.kind == "genai":
        return sum(p.stat().st_size for p in spec.path.glob("*.onnx*"))
    total = 0
    for precision in dict.fromkeys([spec.option, spec.prefill_precision or spec.option]):
        suffix = "" if precision == "fp32" else f"_{precision}"
        total += sum(p.stat().st_size for p in (spec.path / "onnx").glob(f"decoder_model_merged{suffix}.onnx*"))
    return total


def run_class(specs: list[EngineSpec], prompt: np.ndarray, steps: np.ndarray, rounds: int) -> dict[str, Any]:
    """One weight class's engines, loaded together and run in turn, round after round, in a
    rotating order (round 0 warms up and keeps the logits). A class at a time keeps the memory
    of the loaded engines within a 24 GB machine."""
    workers: list[Worker] = []
    try:
        for spec in specs:
            progress(f"loading {spec.name}")
            workers.append(Worker(spec))
        results: dict[str, dict[str, Any]] = {
            w.spec.name: {"load_ms": w.load_ms, "file_bytes": file_bytes(w.spec), "runs": []} for w in workers
        }
        for round_index in range(rounds + 1):
            progress(f"{specs[0].weight_class}: round {round_index} of {rounds}" + " (warm-up)" * (round_index == 0))
            shift = round_index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                time.sleep(SETTLE_S)
                result = worker.run(prompt, steps, keep_logits=round_index == 0)
                entry = results[worker.spec.name]
                if round_index == 0:
                    entry["logits"] = result["logits"]
                else:
                    entry["runs"].append({"prefill_ms": result["prefill_ms"], "step_ms": result["step_ms"]})
    finally:
        for worker in workers:
            worker.close()
    return results


def run_peers(model_dir: Path, work: Path, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_benchmark import machine_description, memory_read_bandwidth

    specs = prepare_engines(model_dir, work)
    vocab = json.loads((work / "qwen2" / "config.json").read_text())["vocab_size"]
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    prompt, steps = workload(min(vocab, len(tokenizer["model"]["vocab"])))
    bandwidth = [memory_read_bandwidth()]
    engines: dict[str, dict[str, Any]] = {}
    for label in CLASSES:  # fp32 first: its logits are the reference
        engines.update(run_class([s for s in specs if s.weight_class == label], prompt, steps, rounds))
    bandwidth.append(memory_read_bandwidth())
    reference = engines[REFERENCE]["logits"]
    for engine in engines.values():
        engine.update(accuracy(engine.pop("logits"), reference))
    return {
        "machine": machine_description(),
        "memory_read_gb_s": [b / 1e9 for b in bandwidth],
        "prompt_tokens": PROMPT_TOKENS,
        "decode_steps": DECODE_STEPS,
        "threads": THREADS,
        "rounds": rounds,
        "versions": peer_versions(),
        "engines": engines,
    }


def peer_versions() -> dict[str, str]:
    from importlib.metadata import version

    import llama_cpp

    versions = {name: version(name) for name in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "gguf")}
    # What llama.cpp was compiled to use here (its SIMD, AMX or not): its own line.
    versions["llama.cpp system info"] = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
    return versions


# --------------------------------------------------------------------------- the report


def per_round(report: dict[str, Any], name: str, key: str) -> list[float]:
    return [run[key] for run in report["engines"][name]["runs"]]


def best_llama(report: dict[str, Any], prefix: str, key: str) -> list[float]:
    """llama.cpp at its best setting, round by round: the faster of flash attention off and on."""
    return [min(pair) for pair in zip(*(per_round(report, f"{prefix}-fa{fa}", key) for fa in (0, 1)), strict=True)]


def peer_times(report: dict[str, Any], peer: str, key: str) -> list[float]:
    return best_llama(report, peer, key) if peer.startswith("llama-") else per_round(report, peer, key)


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def engine_rows(report: dict[str, Any]) -> list[str]:
    lines = [
        "| engine | decode tok/s | prefill ms | decoder file MB | max abs logit diff vs lumen-fp32 | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for name, engine in report["engines"].items():
        step = statistics.median(per_round(report, name, "step_ms"))
        prefill = statistics.median(per_round(report, name, "prefill_ms"))
        lines.append(
            f"| {name} | {1000.0 / step:.1f} | {prefill:.0f} | {engine['file_bytes'] / 1e6:.0f} "
            f"| {engine['max_abs_logit_diff']:.2e} | {engine['top1_agreement']:.1%} |"
        )
    return lines


def class_rows(report: dict[str, Any]) -> list[str]:
    """Ours against each peer, as medians of the per-round ratios (decode: our speed over theirs,
    above 1 is ahead; prefill: our time over theirs, below 1 is ahead)."""
    lines = [
        "| class | ours / peer (llama.cpp: the best of flash attention off and on, per round) "
        "| decode speed, ours / peer | prefill time, ours / peer |",
        "|---|---|---|---|",
    ]
    for label, (main_engine, peers) in CLASSES.items():
        for ours, peer in itertools.product(ours_in_class(label, main_engine), peers):
            decode = median_ratio(peer_times(report, peer, "step_ms"), per_round(report, ours, "step_ms"))
            prefill = median_ratio(per_round(report, ours, "prefill_ms"), peer_times(report, peer, "prefill_ms"))
            lines.append(f"| {label} | {ours} / {peer} | {decode:.2f}x | {prefill:.2f}x |")
    return lines


def ours_in_class(label: str, main_engine: str) -> list[str]:
    candidates = [c.name for c in CANDIDATES if c.weight_class == label]
    return [main_engine, *candidates, *(name for name, (c, _, _) in PREFILL_ENGINES.items() if c == label)]


def report_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    bandwidth = " / ".join(f"{b:.1f}" for b in report["memory_read_gb_s"])
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, {machine['memory_gib']} GiB; "
        f"memory read {bandwidth} GB/s (before / after). {versions}.",
        f"{report['prompt_tokens']}-token prompt, {report['decode_steps']} decode steps, {report['threads']} threads, "
        f"{report['rounds']} rounds after a warm-up; medians.",
        "",
        *engine_rows(report),
        "",
        *class_rows(report),
    ]
    return "\n".join(lines) + "\n"


def main(model_dir: Path, rounds: int, json_path: Path | None) -> int:
    work = Path(os.environ.get("LUMEN_VLM_PEERS_DIR", model_dir.parent / "peers")).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    report = run_peers(model_dir, work, rounds)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(report_markdown(report))
    return 0
