"""The graphs room: rewrites the exported ONNX graphs once, checks them, caches them on disk.

What the runtime uses, and all it may use:
- `OptimizedGraphCache(root)`: the cache, one folder (``<cache_dir>/ort-optimized``). Its
  `open(source, options, providers)` is a session on ORT's optimized copy of a graph (the
  vision encoder and the embedding), saved the first time, for the CPU provider.
- `prepare_decoder(cache, source, fuse_kernels=..., context_length=...)`: the decoder graph
  to open, a `DerivedDecoder` (its path, whether prefill's logits cover the last position only,
  how many attention layers and RMS norms run as one fused kernel), or None to open the
  exported graph as it is. `DerivedDecoder.discard()` drops a copy ORT can no longer open.

Inside: `decoder.py` makes the decoder copy from the rewrites `logits_slice.py`,
`attention_fusion.py` and `norm_fusion.py`, each checked against the nodes it replaces;
`graph_rewrite.py` holds their shared tools; `cache.py` lays out and writes the entries.
"""

from .cache import OptimizedGraphCache
from .decoder import DerivedDecoder, prepare_decoder

__all__ = ["DerivedDecoder", "OptimizedGraphCache", "prepare_decoder"]
