"""tools/quantize_model's rule for the int8 form: which CPUs get 8-bit MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.quantize_model import int8_form_for, quantize_int8

AVX2 = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    "flags, form",
    [
        (AVX2, "integer"),  # first-generation EPYC: MatMulInteger measured faster
        (AVX2 | {"avx512f", "avx512_vnni"}, "nbits"),  # EPYC with AVX-512 VNNI
        (AVX2 | {"avx_vnni"}, "nbits"),
        (AVX2 | {"avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "integer"),  # Xeon with AMX
        (set(), "integer"),  # no x86 flags (an ARM board, or no /proc/cpuinfo)
    ],
)
def test_auto_picks_the_form_measured_faster_for_the_cpu(flags: set[str], form: str) -> None:
    assert int8_form_for(flags) == form


def test_an_unknown_form_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of auto, integer, nbits"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx", form="int4")


def test_quantizing_again_replaces_the_side_file_rather_than_growing_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A decoder with its weights in a side file (as the full-size one is): onnx appends to a
    side file that exists, so a second quantization must start from none."""
    import onnx

    from tools.quantize_model import quantize_q4

    source = tmp_path / "decoder.onnx"
    onnx.save(
        onnx.load(str(tiny_model_dir / "onnx" / "decoder_model_merged.onnx")),
        str(source),
        save_as_external_data=True,
        location="decoder.onnx.data",
    )
    target = tmp_path / "decoder_q4.onnx"
    quantize_q4(source, target)
    first = {path.name: path.stat().st_size for path in tmp_path.glob("decoder_q4.onnx*")}
    quantize_q4(source, target)
    assert len(first) == 2  # the graph and its side file
    assert {path.name: path.stat().st_size for path in tmp_path.glob("decoder_q4.onnx*")} == first
