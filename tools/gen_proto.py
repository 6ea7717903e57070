"""Regenerate the Python gRPC code for ``src/lumen_vlm/proto/ml_service.proto``.

Usage::

    python tools/gen_proto.py           # write ml_service_pb2{.py,.pyi,_grpc.py}
    python tools/gen_proto.py --check   # exit 1 if the committed files are stale

Three lines of protoc's output are rewritten:

* ``_pb2_grpc.py`` imports its sibling as a top-level module
  (``import ml_service_pb2 as ml__service__pb2``), which breaks inside the
  ``lumen_vlm.proto`` package; it becomes a relative import.
* ``_pb2.py`` adds its file to protobuf's default descriptor pool
  (``DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(b'...')``), which
  clashes with the other Lumen packages' copies of the protocol in one process; it
  becomes ``_pool.load_file(b'...')`` (see ``src/lumen_vlm/proto/_pool.py``). Its
  pure-Python-backend block, which stores offsets into our bytes on the descriptors, then
  runs only when the descriptors were built from our bytes (``_pool.built_from_ours``),
  never on another package's reused file.

Generation is deterministic for a fixed grpcio-tools version, and the output
embeds that version (``# Protobuf Python Version: ...`` in ``_pb2.py``,
``GRPC_GENERATED_VERSION`` in ``_pb2_grpc.py``), so ``--check`` also pins the
grpcio-tools version: after upgrading it, regenerate and commit the result.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "src" / "lumen_vlm" / "proto"
PROTO_FILE = "ml_service.proto"
GENERATED = ("ml_service_pb2.py", "ml_service_pb2.pyi", "ml_service_pb2_grpc.py")

_ABS_IMPORT = re.compile(r"^import ml_service_pb2 as ml__service__pb2$", re.MULTILINE)
_REL_IMPORT = "from . import ml_service_pb2 as ml__service__pb2"

_DEFAULT_POOL_ADD = re.compile(r"^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(", re.MULTILINE)
_POOL_LOAD = "from . import _pool as _lumen_pool\nDESCRIPTOR = _lumen_pool.load_file("
_PY_BACKEND_BLOCK = re.compile(r"^if not _descriptor\._USE_C_DESCRIPTORS:$", re.MULTILINE)
_PY_BACKEND_BLOCK_IF_OURS = "if not _descriptor._USE_C_DESCRIPTORS and _lumen_pool.built_from_ours(DESCRIPTOR):"


def _grpc_tools_include() -> str:
    return str(importlib.resources.files("grpc_tools") / "_proto")


def generate(out_dir: Path) -> None:
    """Run protoc into ``out_dir`` and make the grpc module's import package-relative."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{_grpc_tools_include()}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_FILE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")

    missing = [name for name in GENERATED if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"protoc did not produce: {', '.join(missing)}")
    _rewrite_once(out_dir / "ml_service_pb2_grpc.py", _ABS_IMPORT, _REL_IMPORT, "import ml_service_pb2 as ...")
    pb2 = out_dir / "ml_service_pb2.py"
    _rewrite_once(pb2, _DEFAULT_POOL_ADD, _POOL_LOAD, "DESCRIPTOR = ...AddSerializedFile(")
    _rewrite_once(pb2, _PY_BACKEND_BLOCK, _PY_BACKEND_BLOCK_IF_OURS, "if not _descriptor._USE_C_DESCRIPTORS:")


def _rewrite_once(path: Path, pattern: re.Pattern[str], replacement: str, what: str) -> None:
    """Replace the one match of ``pattern`` in ``path``; protoc changing its output is an error."""
    text = path.read_text(encoding="utf-8")
    text, n = pattern.subn(lambda _: replacement, text)
    if n != 1:
        raise RuntimeError(f"expected one '{what}' line in {path.name}, found {n}")
    path.write_text(text, encoding="utf-8")


def check(max_diff_lines: int = 40) -> list[str]:
    """Generate into a temp dir and compare with the committed files.

    Returns a list of human-readable problems; empty means up to date.
    """
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lumen_vlm_proto_") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        for name in GENERATED:
            committed = PROTO_DIR / name
            fresh = (fresh_dir / name).read_text(encoding="utf-8")
            if not committed.is_file():
                problems.append(f"{name}: missing (run tools/gen_proto.py)")
                continue
            current = committed.read_text(encoding="utf-8")
            if current == fresh:
                continue
            diff = list(
                difflib.unified_diff(
                    current.splitlines(),
                    fresh.splitlines(),
                    fromfile=f"committed/{name}",
                    tofile=f"generated/{name}",
                    lineterm="",
                )
            )
            shown = diff[:max_diff_lines]
            if len(diff) > max_diff_lines:
                shown.append(f"... ({len(diff) - max_diff_lines} more diff lines)")
            problems.append(f"{name}: differs from fresh generation\n" + "\n".join(shown))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temp dir and exit 1 if the committed files differ",
    )
    args = parser.parse_args(argv)

    if args.check:
        problems = check()
        if problems:
            print("generated proto code is stale:", file=sys.stderr)
            for problem in problems:
                print(problem, file=sys.stderr)
            print("run: python tools/gen_proto.py", file=sys.stderr)
            return 1
        print("generated proto code is up to date")
        return 0

    generate(PROTO_DIR)
    for name in GENERATED:
        print(f"wrote {(PROTO_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
