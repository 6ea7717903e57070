"""`lumen-vlm` with every decoder call (a prefill chunk or a batched decode step) slowed by SLOW_DECODE_STEP_S seconds.

The tiny test model decodes hundreds of tokens in well under a second, so a test that signals
the server "during a generation" would race the generation's end. Slowing each step (and only
that: the server, signals, drain and health are the real ones) keeps the request in flight.

    python tests/server/slow_decoding_server.py --config config.yaml
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from lumen_vlm.backends.onnxrt_backend import FastVLMONNXBackend
from lumen_vlm.cli import main

STEP_DELAY_S = float(os.environ.get("SLOW_DECODE_STEP_S", "0.01"))
_forward = FastVLMONNXBackend.forward


def slow_forward(self: FastVLMONNXBackend, *args: Any, **kwargs: Any) -> Any:
    time.sleep(STEP_DELAY_S)
    return _forward(self, *args, **kwargs)


if __name__ == "__main__":
    FastVLMONNXBackend.forward = slow_forward  # type: ignore[method-assign]
    sys.exit(main())
