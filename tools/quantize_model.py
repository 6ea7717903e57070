"""Write quantized decoder variants next to a model's fp32 decoder, with onnx-community names.

    python tools/quantize_model.py MODEL_DIR int8 q4

int8: onnxruntime's dynamic quantization (int8 weights, MatMulInteger).
q4:   onnxruntime's MatMulNBits 4-bit weights, block size 32, accuracy_level 4 (int8 dot
      products on CPU, markedly faster than level 0 on x86).
Only onnxruntime and onnx are needed, no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lumen_vlm.resources.model_files import graph_files

DECODER = "decoder_model_merged"


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def quantize_q4(
    source: Path, target: Path, block_size: int = 32, accuracy_level: int = 4, is_symmetric: bool = True, bits: int = 4
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
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)


QUANTIZERS = {"int8": quantize_int8, "q4": quantize_q4}


def quantize_decoder(model_dir: Path, precision: str) -> Path:
    """Write onnx/decoder_model_merged_<precision>.onnx from the fp32 decoder; return its path."""
    onnx_dir = model_dir / "onnx"
    target = onnx_dir / f"{DECODER}_{precision}.onnx"
    QUANTIZERS[precision](onnx_dir / f"{DECODER}.onnx", target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("precisions", nargs="+", choices=sorted(QUANTIZERS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for precision in args.precisions:
        print(quantize_decoder(args.model_dir.expanduser(), precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
