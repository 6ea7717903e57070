"""Write quantized decoder variants next to a model's fp32 decoder, with onnx-community names.

    python tools/quantize_model.py MODEL_DIR int8 q4

int8: 8-bit weights in the form this machine's CPU runs faster (--int8-form, default auto):
      "integer", onnxruntime's dynamic quantization (int8 weights, per tensor, MatMulInteger),
      or "nbits", 8-bit MatMulNBits weights (block 128, symmetric, accuracy_level 4). auto
      picks nbits on an x86 CPU with AVX-512 VNNI or AVX-VNNI and no AMX, integer elsewhere:
      measured (benchmarks/RESULTS.md, "Peers"), nbits decoded 1.09-1.43x as fast as integer
      and prefilled within 5% of its time on an AMD EPYC with AVX-512 VNNI, with half its
      logit error, but 0.66x as fast on an AVX2-only EPYC; with AMX, integer's prefill is
      the fastest measured (ORT's AMX int8 GEMM). The file has the same name either way.
q4:   onnxruntime's MatMulNBits 4-bit weights, block size 128 with zero points (asymmetric),
      accuracy_level 4 (int8 dot products on CPU, markedly faster than level 0 on x86). Block
      128 decoded 1.06-1.40x as fast as block 32 on the machines measured (benchmarks/RESULTS.md,
      "Peers"), at the same top-1 agreement with fp32 and a ~9% larger max logit error;
      zero points made it more accurate than symmetric block 128, and no slower.
Only onnxruntime and onnx are needed, no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lumen_vlm.resources.model_files import graph_files, remove_graph

DECODER = "decoder_model_merged"
log = logging.getLogger("quantize_model")


INT8_FORMS = ("auto", "integer", "nbits")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them; empty where it does not."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_form_for(flags: set[str]) -> str:
    """auto's choice of int8 form for a CPU with these flags (see the module's docstring)."""
    has_vnni = bool(flags & {"avx512_vnni", "avx_vnni"})
    return "nbits" if has_vnni and "amx_int8" not in flags else "integer"


def quantize_int8(source: Path, target: Path, form: str = "auto") -> str:
    """int8 weights in `form` (resolved for this CPU when auto); return the form written."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    chosen = int8_form_for(cpu_flags()) if form == "auto" else form
    if chosen == "nbits":
        quantize_q4(source, target, block_size=128, is_symmetric=True, bits=8)
    elif chosen == "integer":
        remove_graph(target)
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    else:
        raise ValueError(f"int8 form {form!r}: choose one of {', '.join(INT8_FORMS)}")
    log.info("%s: int8 weights as %s", target.name, "MatMulNBits" if chosen == "nbits" else "MatMulInteger")
    return chosen


def quantize_q4(
    source: Path,
    target: Path,
    block_size: int = 128,
    accuracy_level: int = 4,
    is_symmetric: bool = False,
    bits: int = 4,
) -> None:
    """MatMulNBits weights; the keywords are the choices benchmarks/peers.py's candidates vary."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level
    )
    quantizer.process()
    # Past protobuf's 2 GB limit, or already split: keep the weights in a side file.
    large = source.stat().st_size > 1_800_000_000 or len(graph_files(source)) > 1
    remove_graph(target)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)


PRECISIONS = ("int8", "q4")


def quantize_decoder(model_dir: Path, precision: str, int8_form: str = "auto") -> Path:
    """Write onnx/decoder_model_merged_<precision>.onnx from the fp32 decoder; return its path."""
    onnx_dir = model_dir / "onnx"
    target = onnx_dir / f"{DECODER}_{precision}.onnx"
    source = onnx_dir / f"{DECODER}.onnx"
    if precision == "int8":
        quantize_int8(source, target, int8_form)
    elif precision == "q4":
        quantize_q4(source, target)
    else:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("precisions", nargs="+", choices=PRECISIONS)
    parser.add_argument(
        "--int8-form", choices=INT8_FORMS, default="auto", help="int8's kernels (default: auto, for this CPU)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # onnxruntime's quantizers say much at INFO
    log.setLevel(logging.INFO)
    for precision in args.precisions:
        print(quantize_decoder(args.model_dir.expanduser(), precision, args.int8_form))
    return 0


if __name__ == "__main__":
    sys.exit(main())
