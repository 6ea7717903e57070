"""The tensor names of the FastVLM ONNX export, spelled once.

The onnx-community export (and the Lumen repos, which repackage it) name the embedding and
decoder graphs' inputs and outputs as transformers.js and optimum do. The runtime binds them,
the graph rewrites find the attention layers by them, and the test model is exported with them;
all three read them here. It lives in `resources/` so that both the runtime (`backends/`) and the
graphs room (`graphs/`), which must not import the runtime, may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class ExportNames:
    """The export's tensor names; `EXPORT_NAMES` is the one instance."""

    input_ids: str = "input_ids"  # the embedding graph's only input
    inputs_embeds: str = "inputs_embeds"  # the embedding graph's output, the decoder's input
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits: str = "logits"
    # Optional decoder inputs some exports add (see backends.onnxrt_backend.DecoderFeeds).
    logits_to_keep: str = "num_logits_to_keep"  # transformers.js exports
    cache_branch: str = "use_cache_branch"  # optimum's merged decoders

    def past(self, layer: int) -> tuple[str, str]:
        """Layer `layer`'s KV cache inputs: (key, value)."""
        return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"

    def present(self, layer: int) -> tuple[str, str]:
        """Layer `layer`'s KV cache outputs: (key, value)."""
        return f"present.{layer}.key", f"present.{layer}.value"

    def past_layer(self, name: str) -> int | None:
        """The layer a KV cache input `name` belongs to; None for any other name."""
        match = _PAST.match(name)
        return int(match.group(1)) if match else None


EXPORT_NAMES = ExportNames()
