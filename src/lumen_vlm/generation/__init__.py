"""Pure-numpy generation helpers: sampling, streaming detokenization and the per-sequence stop rules."""

from lumen_vlm.generation.detokenizer import IncrementalDetokenizer
from lumen_vlm.generation.sampling import (
    SamplingParams,
    TokenSampler,
    apply_repetition_penalty,
    apply_temperature,
    process_logits,
    top_k_filter,
    top_p_filter,
)
from lumen_vlm.generation.sequence import SequenceText
from lumen_vlm.generation.stopping import FinishReason, StopSequenceFilter, clamp_max_new_tokens

__all__ = [
    "FinishReason",
    "IncrementalDetokenizer",
    "SamplingParams",
    "SequenceText",
    "StopSequenceFilter",
    "TokenSampler",
    "apply_repetition_penalty",
    "apply_temperature",
    "clamp_max_new_tokens",
    "process_logits",
    "top_k_filter",
    "top_p_filter",
]
