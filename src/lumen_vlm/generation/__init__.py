"""Pure generation helpers: sampling, streaming detokenization, the per-sequence stop rules and
the grammar constraints of structured output."""

from lumen_vlm.generation.constraint import (
    RESPONSE_FORMAT_KINDS,
    ConstraintError,
    Grammar,
    GrammarCompiler,
    ResponseFormat,
    TokenConstraint,
)
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
    "RESPONSE_FORMAT_KINDS",
    "ConstraintError",
    "FinishReason",
    "Grammar",
    "GrammarCompiler",
    "IncrementalDetokenizer",
    "ResponseFormat",
    "SamplingParams",
    "SequenceText",
    "StopSequenceFilter",
    "TokenConstraint",
    "TokenSampler",
    "apply_repetition_penalty",
    "apply_temperature",
    "clamp_max_new_tokens",
    "process_logits",
    "top_k_filter",
    "top_p_filter",
]
