"""Build a random-weight FastVLM with transformers, export it to ONNX, and record goldens.

The model directory has the layout of the public onnx-community FastVLM export:

    config.json  generation_config.json  preprocessor_config.json
    tokenizer.json  tokenizer_config.json
    onnx/vision_encoder.onnx  onnx/embed_tokens.onnx  onnx/decoder_model_merged.onnx

The golden file holds what transformers' own `FastVlmForConditionalGeneration` produces
(greedy token ids, decoded text, prefill logits, pixel arrays) for a fixed set of cases, so
the ONNX engine can be checked against the reference without torch at test time.

    python tools/make_test_model.py --out tests/fixtures/tiny-fastvlm --golden tests/fixtures/golden
    python tools/make_test_model.py --size full --out ~/.cache/lumen-vlm-bench/fastvlm-full

Needs the `[tools]` extra (torch==2.13.0 CPU, transformers 5.x, timm, onnx, onnxscript, dashscope).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("make_test_model")

# Qwen2's pre-tokenizer split pattern (single digits, unlike tiktoken's cl100k pattern).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML, as FastVLM (a Qwen2 LLaVA) uses it: a default system turn when none is given.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class SizePreset:
    """Architecture of one model size."""

    bpe_ranks: int | None  # None = the whole Qwen vocabulary
    vocab_size: int | None  # None = ranks + special tokens, rounded up to a multiple of 64
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    vision_layers: tuple[int, ...] | None  # None = fastvit_mci3's own
    vision_dims: tuple[int, ...] | None
    image_size: int


SIZES = {
    # A few MB: a real Qwen2 BPE cut to its first ranks, 2 decoder layers, a 5-stage FastViT.
    "tiny": SizePreset(
        bpe_ranks=4000,
        vocab_size=None,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        vision_layers=(1, 1, 1, 1, 1),
        vision_dims=(8, 16, 32, 64, 128),
        image_size=256,
    ),
    # The FastVLM-0.5B architecture: Qwen2-0.5B decoder, FastViTHD (fastvit_mci3) at 1024 px.
    "full": SizePreset(
        bpe_ranks=None,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        vision_layers=None,
        vision_dims=None,
        image_size=1024,
    ),
}


# --------------------------------------------------------------------------- imports


_TORCHVISION_SHIM: list[Any] = []  # the operator library must outlive the import


def import_reference_stack() -> None:
    """Import torch, timm and transformers on a CPU-only torch.

    timm imports torchvision, and PyPI's torchvision wheel fails beside the CPU torch with
    "operator torchvision::nms does not exist". Declaring the two operator schemas first lets
    the import succeed; nothing here ever calls them.
    """
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        sys.modules.pop("torchvision", None)
        for name in [m for m in sys.modules if m.startswith("torchvision.")]:
            sys.modules.pop(name)
        _TORCHVISION_SHIM.append(torch.library.Library("torchvision", "DEF"))
        _TORCHVISION_SHIM[0].define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SHIM[0].define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm  # noqa: F401
    import transformers  # noqa: F401


# --------------------------------------------------------------------------- tokenizer


def qwen_bpe_ranks() -> dict[bytes, int]:
    """The Qwen BPE ranks shipped by the `dashscope` package (qwen.tiktoken)."""
    from importlib.resources import files

    from tiktoken.load import load_tiktoken_bpe

    path = files("dashscope") / "resources" / "qwen.tiktoken"
    return load_tiktoken_bpe(str(path))


def build_tokenizer(preset: SizePreset) -> tuple[Any, dict[str, int], int]:
    """A Qwen2 byte-level BPE tokenizer; returns (tokenizer, special ids, vocab size)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = qwen_bpe_ranks()
    if preset.bpe_ranks is not None:
        # BPE ranks are merge order, so a prefix of them is itself a complete BPE vocabulary.
        ranks = {token: rank for token, rank in ranks.items() if rank < preset.bpe_ranks}
    byte_encoder = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        if splits:
            left, right = min(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
            merges.append((rank, to_str(left), to_str(right)))
    merges.sort()
    tokenizer = Tokenizer(BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False))
    tokenizer.model.ignore_merges = False
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    first_special = len(ranks)
    special_ids = {}
    for offset, text in enumerate((*SPECIAL_TOKENS, IMAGE_TOKEN)):
        tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        special_ids[text] = tokenizer.token_to_id(text)
        assert special_ids[text] == first_special + offset, text
    vocab_size = preset.vocab_size or (-(-(first_special + 4) // 64) * 64)
    return tokenizer, special_ids, vocab_size


def tokenizer_config(special_ids: dict[str, int], max_length: int) -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for text, token_id in special_ids.items()
        },
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# --------------------------------------------------------------------------- model


def build_config(preset: SizePreset, special_ids: dict[str, int], vocab_size: int) -> Any:
    from transformers import FastVlmConfig

    model_args: dict[str, Any] = {"inference_mode": True}
    if preset.vision_layers is not None:
        model_args["layers"] = preset.vision_layers
        model_args["embed_dims"] = preset.vision_dims
    # fastvit_mci3's final conv widens its last stage 2x (cls_ratio), giving the feature width.
    vision_hidden = 2 * (preset.vision_dims[-1] if preset.vision_dims else 1536)
    head_dim = preset.hidden_size // preset.num_heads
    return FastVlmConfig(
        vision_config={
            "model_type": "timm_wrapper",
            "architecture": "fastvit_mci3",
            "do_pooling": False,
            "hidden_size": vision_hidden,
            "model_args": model_args,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": preset.hidden_size,
            "intermediate_size": preset.intermediate_size,
            "num_hidden_layers": preset.num_layers,
            "num_attention_heads": preset.num_heads,
            "num_key_value_heads": preset.num_kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": preset.max_position_embeddings,
            "rope_theta": 1_000_000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": preset.tie_word_embeddings,
            "bos_token_id": special_ids["<|endoftext|>"],
            "eos_token_id": special_ids["<|im_end|>"],
        },
        image_token_index=special_ids[IMAGE_TOKEN],
        image_seq_length=(preset.image_size // 64) ** 2,
        tie_word_embeddings=preset.tie_word_embeddings,
    )


def redraw_weights(model: Any, seed: int) -> None:
    """Re-draw the random weights so that greedy output varies and depends on the image.

    transformers' default init (N(0, 0.02), tied embeddings) makes a random model repeat one
    token forever, which would make token parity meaningless. Scaled N(0, 1/fan_in) linears,
    unit-variance embeddings and a separate, louder lm_head give varied, image-dependent text.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param[0].numel()
                scale = 1.0 / fan_in**0.5
                if "embed_tokens" in name:
                    scale = 1.0
                elif name == "lm_head.weight":
                    scale = 4.0 / fan_in**0.5
                elif "multi_modal_projector.linear_2" in name:
                    scale = 3.0 / fan_in**0.5  # image features as loud as token embeddings
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build_model(config: Any, seed: int) -> Any:
    import torch
    from transformers import FastVlmForConditionalGeneration

    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config).eval()
    redraw_weights(model, seed)
    return model


# --------------------------------------------------------------------------- ONNX export


def export_onnx(model: Any, preset: SizePreset, out_dir: Path) -> None:
    """Export the three graphs of the onnx-community layout."""
    import torch

    from lumen_vlm.resources.export_names import EXPORT_NAMES as NAMES

    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    text = model.config.text_config
    head_dim = text.head_dim
    batch = torch.export.Dim("batch", min=1, max=64)

    class EmbedTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = model.get_input_embeddings()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.embed(input_ids)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.language_model = model.model.language_model
            self.lm_head = model.lm_head

        def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):  # type: ignore[no-untyped-def]
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=past_key_values, config=model.config.text_config)
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            logits = self.lm_head(out.last_hidden_state)
            presents = []
            for layer in cache.layers:
                presents.extend([layer.keys, layer.values])
            return (logits, *presents)

    log.info("exporting vision_encoder")
    export_vision_encoder(model, preset.image_size, onnx_dir / "vision_encoder.onnx")
    log.info("exporting embed_tokens")
    export(
        EmbedTokens(),
        (torch.randint(0, 100, (2, 5)),),
        onnx_dir / "embed_tokens.onnx",
        input_names=[NAMES.input_ids],
        output_names=[NAMES.inputs_embeds],
        dynamic_shapes={"input_ids": {0: batch, 1: torch.export.Dim("sequence_length", max=1 << 20)}},
    )
    log.info("exporting decoder_model_merged")
    # Example sizes > 1 and pairwise different, or the exporter specialises them into the graph.
    b, seq, past = 2, 3, 5
    past_kv = [
        (
            torch.randn(b, text.num_key_value_heads, past, head_dim),
            torch.randn(b, text.num_key_value_heads, past, head_dim),
        )
        for _ in range(text.num_hidden_layers)
    ]
    # The names the service reads (as the onnx-community export spells them).
    past_names = [name for i in range(text.num_hidden_layers) for name in NAMES.past(i)]
    present_names = [name for i in range(text.num_hidden_layers) for name in NAMES.present(i)]
    auto = torch.export.Dim.AUTO
    export(
        Decoder(),
        (
            torch.randn(b, seq, text.hidden_size),
            torch.ones(b, past + seq, dtype=torch.int64),
            torch.arange(past, past + seq).expand(b, seq).contiguous(),
            past_kv,
        ),
        onnx_dir / "decoder_model_merged.onnx",
        input_names=[NAMES.inputs_embeds, NAMES.attention_mask, NAMES.position_ids, *past_names],
        output_names=[NAMES.logits, *present_names],
        dynamic_shapes={  # keyed by the forward's argument names
            "inputs_embeds": {0: batch, 1: auto},
            "attention_mask": {0: batch, 1: auto},
            "position_ids": {0: batch, 1: auto},
            "past_key_values": [({0: batch, 2: auto}, {0: batch, 2: auto})] * text.num_hidden_layers,
        },
    )


def export_vision_encoder(model: Any, size: int, path: Path) -> None:
    """The vision encoder's graph at `size` px: pixel_values [batch, 3, size, size] ->
    image_features (benchmarks/vision_encoder.py exports it at other sizes too)."""
    import torch

    class VisionEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    export(
        VisionEncoder(),
        (torch.randn(2, 3, size, size),),
        path,
        input_names=["pixel_values"],
        output_names=["image_features"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}},
    )


def export(module: Any, args: tuple, path: Path, **kwargs: Any) -> None:
    import onnx
    import torch

    program = torch.onnx.export(module, args, dynamo=True, optimize=True, **kwargs)
    # Graphs past protobuf's 2 GB limit keep their weights in a side file (path + "_data").
    program.save(str(path), external_data=not _fits_in_protobuf(program))
    onnx.checker.check_model(str(path))


def _fits_in_protobuf(program: Any) -> bool:
    total = sum(
        value.const_value.nbytes for value in program.model.graph.initializers.values() if value.const_value is not None
    )
    return total < 1_800_000_000


# --------------------------------------------------------------------------- files


def write_model_dir(
    out_dir: Path, preset: SizePreset, config: Any, tokenizer: Any, special_ids: dict[str, int]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["architectures"] = ["FastVlmForConditionalGeneration"]
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    generation_config = {
        "bos_token_id": special_ids["<|endoftext|>"],
        # Both ends of a turn stop generation, as in Qwen2-Instruct's generation config.
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
        "do_sample": False,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    size = preset.image_size
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tok_config = tokenizer_config(special_ids, preset.max_position_embeddings)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


# --------------------------------------------------------------------------- goldens


def make_images(size: int) -> dict[str, bytes]:
    """Deterministic synthetic photos: a landscape PNG and a portrait JPEG."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1234)
    landscape = Image.fromarray(
        (np.linspace(0, 255, 320)[None, :, None] * np.array([1.0, 0.6, 0.2])).astype(np.uint8).repeat(200, axis=0)
    )
    draw = ImageDraw.Draw(landscape)
    draw.ellipse((120, 40, 220, 140), fill=(250, 240, 40))
    draw.rectangle((10, 150, 300, 190), fill=(30, 120, 30))
    portrait = Image.fromarray(rng.integers(0, 255, (300, 180, 3), dtype=np.uint8))
    ImageDraw.Draw(portrait).rectangle((40, 60, 140, 240), fill=(200, 20, 20))
    images = {}
    buf = io.BytesIO()
    landscape.save(buf, format="PNG")
    images["landscape.png"] = buf.getvalue()
    buf = io.BytesIO()
    portrait.save(buf, format="JPEG", quality=90)
    images["portrait.jpg"] = buf.getvalue()
    return images


GOLDEN_CASES: list[dict[str, Any]] = [
    {
        # The seed README's request: a plain question, no <image> placeholder.
        "name": "describe",
        "image": "landscape.png",
        "messages": [{"role": "user", "content": "What do you see in this image?"}],
    },
    {
        # Same question, another photo: the answer must change with the image.
        "name": "describe_portrait",
        "image": "portrait.jpg",
        "messages": [{"role": "user", "content": "What do you see in this image?"}],
    },
    {
        "name": "system_prompt",
        "image": "portrait.jpg",
        "messages": [
            {"role": "system", "content": "You are a terse photo critic."},
            {"role": "user", "content": "<image>\nRate this photo from 1 to 10."},
        ],
    },
    {
        "name": "multi_turn",
        "image": "landscape.png",
        "messages": [
            {"role": "user", "content": "<image>\nWhat is in the picture?"},
            {"role": "assistant", "content": "A yellow sun over a green field."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
    },
    {
        "name": "cjk_emoji",
        "image": "portrait.jpg",
        "messages": [{"role": "user", "content": "这张照片里有什么？请用中文回答。🙂📷"}],
    },
    {
        "name": "crop_mode",
        "image": "portrait.jpg",
        "resize_mode": "crop",
        "messages": [{"role": "user", "content": "Describe the red shape."}],
    },
]


def reference_pixels(image_bytes: bytes, size: int, mode: str) -> np.ndarray:
    """transformers' CLIP image processor, after Apple's expand2square for "pad"."""
    import io

    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    if mode == "pad":
        width, height = image.size
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        resample=3,
    )
    return processor(images=image, return_tensors="np")["pixel_values"].astype(np.float32)


def reference_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Apple's predict.py rule: with no <image> in the request, it leads the first user turn."""
    if any(IMAGE_TOKEN in m["content"] for m in messages):
        return messages
    out = [dict(m) for m in messages]
    first_user = next(m for m in out if m["role"] == "user")
    first_user["content"] = IMAGE_TOKEN + "\n" + first_user["content"]
    return out


def make_goldens(model: Any, model_dir: Path, golden_dir: Path, preset: SizePreset, max_new_tokens: int) -> None:
    import torch
    from transformers import AutoTokenizer

    golden_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    generation = json.loads((model_dir / "generation_config.json").read_text())
    image_token_id = model.config.image_token_index
    images = make_images(preset.image_size)
    for name, data in images.items():
        (golden_dir / name).write_bytes(data)
    arrays: dict[str, np.ndarray] = {}
    cases = []
    for case in GOLDEN_CASES:
        mode = case.get("resize_mode", "pad")
        pixels = reference_pixels(images[case["image"]], preset.image_size, mode)
        prompt = tokenizer.apply_chat_template(
            reference_messages(case["messages"]), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        n_image_tokens = features.shape[1]
        expanded = []
        for token in ids:
            expanded.extend([token] * n_image_tokens if token == image_token_id else [token])
        input_ids = torch.tensor([expanded])
        with torch.no_grad():
            prefill = model(input_ids=input_ids, pixel_values=torch.from_numpy(pixels)).logits[0].numpy()
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.from_numpy(pixels),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=generation["eos_token_id"],
                pad_token_id=generation["pad_token_id"],
            )
        new_ids = output[0, input_ids.shape[1] :].tolist()
        eos_hit = bool(new_ids) and new_ids[-1] in generation["eos_token_id"]
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        arrays[f"{case['name']}.pixel_values"] = pixels
        arrays[f"{case['name']}.prefill_logits_last"] = prefill[-1].astype(np.float32)
        arrays[f"{case['name']}.prefill_logits_first"] = prefill[0].astype(np.float32)
        cases.append(
            {
                **case,
                "resize_mode": mode,
                "prompt": prompt,
                "input_ids": expanded,
                "image_tokens": n_image_tokens,
                "output_ids": new_ids,
                "text": text,
                "finish_reason": "eos_token" if eos_hit else "length",
                "max_new_tokens": max_new_tokens,
            }
        )
        log.info("golden %s: %d prompt tokens -> %r", case["name"], len(expanded), text[:60])
    check_image_dependence(cases)
    np.savez_compressed(golden_dir / "golden_arrays.npz", **arrays)
    import transformers

    golden = {
        "produced_by": f"transformers {transformers.__version__} FastVlmForConditionalGeneration, greedy",
        "cases": cases,
    }
    (golden_dir / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")


def check_image_dependence(cases: list[dict[str, Any]]) -> None:
    """Refuse goldens from a model whose output ignores the image: parity would prove little."""
    seen: dict[str, tuple[str, list[int]]] = {}
    for case in cases:
        key = json.dumps(case["messages"]) + case["resize_mode"]
        if key in seen and seen[key][0] != case["image"] and seen[key][1] == case["output_ids"]:
            raise SystemExit(f"cases {case['name']} and its twin give the same output for different images")
        seen[key] = (case["image"], case["output_ids"])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--golden", type=Path, help="also write transformers' golden outputs here")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--save-torch", action="store_true", help="also save the PyTorch weights under OUT/torch (for benchmarks)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # The ONNX optimizer logs every folded initializer at INFO.
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import_reference_stack()
    preset = SIZES[args.size]
    out_dir = args.out.expanduser()
    if (out_dir / "onnx").exists():
        shutil.rmtree(out_dir / "onnx")
    tokenizer, special_ids, vocab_size = build_tokenizer(preset)
    config = build_config(preset, special_ids, vocab_size)
    model = build_model(config, args.seed)
    write_model_dir(out_dir, preset, config, tokenizer, special_ids)
    export_onnx(model, preset, out_dir)
    if args.save_torch:
        model.save_pretrained(str(out_dir / "torch"))
    if args.golden:
        make_goldens(model, out_dir, args.golden.expanduser(), preset, args.max_new_tokens)
    log.info("wrote %s", out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
