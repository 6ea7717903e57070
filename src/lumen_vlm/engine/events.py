"""What the engine sends back for a request: text deltas, then one result (or one error)."""

from __future__ import annotations

from dataclasses import dataclass

from ..generation import FinishReason


@dataclass(frozen=True)
class TextDelta:
    """Newly final text; the deltas of one generation join to its result's text."""

    text: str
    generated_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """The end of one generation."""

    text: str
    finish_reason: FinishReason
    generated_tokens: int
    input_tokens: int
    image_tokens: int
    max_new_tokens: int  # the budget it had: the request's, clamped to the room in its KV slot
    ttft_ms: float  # submitted -> first token sampled (queue, image and prefill included)
    generation_time_ms: float  # submitted -> done
    token_ids: tuple[int, ...] = ()  # every sampled token, the final eos included
    response_format: str | None = None  # the kind of constraint applied (json, json_schema, regex); None: free text


GenerationEvent = TextDelta | GenerationResult
