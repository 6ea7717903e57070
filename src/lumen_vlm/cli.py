"""Command line: run the server, or describe one photo.

lumen-vlm --config config.yaml [--port N] [--host H] [--log-level L]
lumen-vlm describe IMAGE [--prompt TEXT] (--config FILE | --model DIR_OR_NAME)
lumen-vlm --version
python -m lumen_vlm.server CONFIG [PORT]    (the seed README's form of the first)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .resources.config import DEFAULT_CACHE_DIR
from .resources.exceptions import CONFIG_ERROR_EXIT
from .resources.settings import VLMSettings

log = logging.getLogger("lumen_vlm")
DEFAULT_PROMPT = "Describe this photo."


def setup_logging(level: str = "INFO") -> None:
    """Colourised console logging (plain when the output is not a terminal)."""
    import colorlog

    handler = colorlog.StreamHandler()
    handler.setFormatter(
        colorlog.ColoredFormatter(
            "%(log_color)s%(asctime)s %(levelname)-7s%(reset)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            no_color=not sys.stderr.isatty(),
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # huggingface_hub's HTTP client logs every request at INFO (a line per file downloaded):
    # those lines are for DEBUG only.
    for chatty in ("httpx", "httpx2"):
        logging.getLogger(chatty).setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumen-vlm",
        description="FastVLM vision-language service for Lumen (gRPC, and HTTP: the Ollama and OpenAI APIs). "
        "Use 'lumen-vlm describe IMAGE --model DIR' to try a model without a server.",
    )
    parser.add_argument("--config", required=True, type=Path, help="Lumen YAML config file")
    parser.add_argument("--port", type=int, help="port to listen on (overrides the config)")
    parser.add_argument("--host", help="address to bind (overrides the config)")
    parser.add_argument(
        "--http-port", type=int, help="serve the Ollama and OpenAI APIs on this port too (overrides server.http.port)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"lumen-vlm {__version__}")
    return parser


def _describe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumen-vlm describe", description="Describe one image, streaming the answer.")
    parser.add_argument("image", type=Path)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="Lumen YAML config file naming the model")
    source.add_argument("--model", help="model directory, Lumen model name or Hugging Face repo id")
    parser.add_argument("--precision", default=None, help="fp32, fp16, int8, q4, ... (default: the config's or fp32)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"model cache (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _settings_for_describe(args: argparse.Namespace) -> VLMSettings:
    from .resources.config import load_settings, settings_from_mapping, with_precision

    if args.config is not None:
        settings = load_settings(args.config)
    else:
        mapping = {
            "cache_dir": args.cache_dir,
            "services": {"vlm": {"models": {"cli": {"model": args.model, "runtime": "onnx"}}}},
        }
        settings = settings_from_mapping(mapping, base_dir=Path.cwd())
    return with_precision(settings, args.precision) if args.precision else settings


def serve_main(argv: list[str]) -> int:
    """Check the config, then serve: the port opens before a model that must be downloaded is.

    Config errors, and those of a model already on disk, exit CONFIG_ERROR_EXIT before the port
    opens; a model still to download is downloaded and checked behind the open port.
    """
    from .fastvlm.fastvlm_model import FastVLMModelManager
    from .resources.config import load_settings
    from .resources.exceptions import ResourceError
    from .resources.loader import model_on_disk, resolve_model
    from .server import run, settings_with_overrides

    args = _serve_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        settings = settings_with_overrides(load_settings(args.config), args.host, args.port, args.http_port)
        FastVLMModelManager.check_device(settings)  # before a download, which may take minutes
        model_dir = model_on_disk(settings)
        if model_dir is not None:
            FastVLMModelManager.check_loadable(settings, model_dir)
    except ResourceError as exc:
        log.error("%s", exc)
        return CONFIG_ERROR_EXIT
    log.debug("settings: %s", settings)
    # A model still to download is fetched behind the open port; loading it checks it.
    return run(settings, lambda: model_dir or resolve_model(settings))


def describe_main(argv: list[str]) -> int:
    from .engine import Engine, TextDelta
    from .fastvlm.exceptions import InputError
    from .fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest
    from .generation import SamplingParams
    from .resources.exceptions import ResourceError
    from .resources.loader import resolve_model

    args = _describe_parser().parse_args(argv)
    setup_logging(args.log_level)
    # Everything cheap is checked before a download, which may take minutes.
    try:
        settings = _settings_for_describe(args)
        FastVLMModelManager.check_device(settings)
    except ResourceError as exc:
        log.error("%s", exc)
        return CONFIG_ERROR_EXIT
    try:
        image = args.image.read_bytes()
    except OSError as exc:
        log.error("cannot read %s: %s", args.image, exc)
        return 1
    try:
        manager = FastVLMModelManager.from_settings(settings, resolve_model(settings))
    except ResourceError as exc:  # the download, or the model's files and graphs
        log.error("%s", exc)
        return CONFIG_ERROR_EXIT
    params = GenerationParams(max_new_tokens=args.max_new_tokens, sampling=SamplingParams(temperature=args.temperature))
    request = GenerationRequest([{"role": "user", "content": args.prompt}], image, params)
    engine = Engine(manager, settings.admission, settings.limits)
    try:
        for event in engine.submit(request):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
    except InputError as exc:
        log.error("%s", exc)
        return 1
    finally:
        engine.close()
        manager.close()
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "describe":
        return describe_main(args[1:])
    return serve_main(args)


def server_module_main(argv: list[str] | None = None) -> int:
    """`python -m lumen_vlm.server CONFIG [PORT]`, as the seed README runs it: the same as
    `lumen-vlm --config CONFIG [--port PORT]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m lumen_vlm.server CONFIG.yaml [PORT]", file=sys.stderr)
        return 2
    serve_args = ["--config", args[0]]
    if len(args) > 1:
        serve_args += ["--port", args[1]]
    return serve_main(serve_args)


if __name__ == "__main__":
    sys.exit(main())
