"""The engine's batches give transformers' greedy tokens, whoever else is in the batch.

The goldens are transformers' own greedy outputs for the tiny model (tests/fixtures/golden);
a request for k new tokens must give the first k of them, alone, with others of different
lengths joining and leaving around it, on the fused (batched) path and on the graph as
exported (slots run one after another).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from lumen_vlm.engine import ClientGone, DeadlineExceeded, Engine, GenerationResult, TextDelta
from lumen_vlm.fastvlm.exceptions import InputError
from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest
from lumen_vlm.generation import FinishReason, SamplingParams
from lumen_vlm.resources.settings import AdmissionSettings

from ..parity import LOGIT_TOLERANCE, golden_request
from ..service.conftest import ThrottledManager, wait_until
from .conftest import BatchRecorder

TIMEOUT = 60.0


def engine_for(model: Any, **settings: Any) -> Engine:
    return Engine(model, AdmissionSettings(**{"max_concurrency": 4, "max_queue": 16, **settings}))


def with_tokens(case: dict[str, Any], tokens: int) -> GenerationRequest:
    request = golden_request(case)
    return replace(request, params=replace(request.params, max_new_tokens=tokens))


def expected(case: dict[str, Any], tokens: int) -> list[int]:
    return case["output_ids"][:tokens]


@pytest.fixture(params=["fused", "as_exported"])
def model(request: pytest.FixtureRequest, fused_manager: Any, manager: Any) -> Any:
    return fused_manager if request.param == "fused" else manager


def test_every_golden_case_alone(model: Any, golden: dict[str, Any]) -> None:
    engine = engine_for(model)
    try:
        for case in golden["cases"]:
            result = engine.submit(golden_request(case)).result()
            assert list(result.token_ids) == case["output_ids"], case["name"]
            assert result.text == case["text"]
            assert result.finish_reason.value == case["finish_reason"]
    finally:
        engine.close()


def test_golden_cases_while_others_of_different_lengths_join_and_leave(model: Any, golden: dict[str, Any]) -> None:
    """Twelve requests of 3 to 24 tokens through four slots: the batch changes at almost every
    step, and every request still gives transformers' tokens."""
    recorder = BatchRecorder(model, step_s=0.005)  # so that later arrivals surely overlap
    engine = engine_for(recorder)
    cases = golden["cases"] * 2
    lengths = [24, 3, 17, 8, 24, 5, 11, 24, 2, 19, 24, 7]
    try:
        handles = []
        for index, (case, tokens) in enumerate(zip(cases, lengths, strict=True)):
            handles.append((case, tokens, engine.submit(with_tokens(case, tokens))))
            if index % 3 == 2:
                time.sleep(0.01)  # some arrive while others run
        for case, tokens, handle in handles:
            result = handle.result()
            assert list(result.token_ids) == expected(case, tokens), (case["name"], tokens)
            assert result.finish_reason is FinishReason.LENGTH
    finally:
        engine.close()
    assert max(recorder.batch_sizes) > 1, "the requests were decoded in batches"
    assert sum(recorder.batch_sizes) > len(recorder.batch_sizes), "most steps carried several sequences"


def test_prefill_logits_in_a_slot_beside_others_match_transformers(fused_manager: Any, golden: dict[str, Any]) -> None:
    """Prefill into slot 2 while slots 0 and 1 hold other prompts: the logits are the golden's."""
    cache = fused_manager.new_kv_cache(3, 512)
    other = fused_manager.prepare(golden_request(golden["cases"][1]))
    for slot in (0, 1):
        list(fused_manager.prefill(other, cache, slot, 256))
    for case in golden["cases"]:
        prepared = fused_manager.prepare(golden_request(case))
        for chunk in (256, 7):  # whole, and in chunks of 7 tokens
            cache.release(2)
            logits = [out for out in fused_manager.prefill(prepared, cache, 2, chunk) if out is not None][-1]
            diff = float(np.abs(logits - case["arrays"]["prefill_logits_last"]).max())
            assert diff < LOGIT_TOLERANCE, (case["name"], chunk, diff)


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_batch(model: Any, golden: dict[str, Any]) -> None:
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    request = GenerationRequest(
        golden["cases"][0]["messages"], golden["cases"][0]["image_bytes"], GenerationParams(20, sampling)
    )
    engine = engine_for(model)
    try:
        alone = engine.submit(request).result()
        others = [engine.submit(with_tokens(case, 24)) for case in golden["cases"][1:4]]
        in_batch = engine.submit(request).result()
        for handle in others:
            handle.result()
    finally:
        engine.close()
    assert in_batch.token_ids == alone.token_ids
    assert in_batch.text == alone.text
    greedy = tuple(golden["cases"][0]["output_ids"][:20])
    assert alone.token_ids != greedy, "sampling at temperature 0.9 left the greedy path"


def test_a_stop_sequence_in_one_row_only(model: Any, golden: dict[str, Any]) -> None:
    case = golden["cases"][0]
    stop = case["text"][10:14]
    request = golden_request(case)
    stopped = replace(request, params=replace(request.params, stop_sequences=(stop,)))
    engine = engine_for(model)
    try:
        handles = [engine.submit(request), engine.submit(stopped), engine.submit(request)]
        results = [handle.result() for handle in handles]
    finally:
        engine.close()
    assert results[1].finish_reason is FinishReason.STOP_SEQUENCE
    assert results[1].text == case["text"][: case["text"].index(stop)]
    for result in (results[0], results[2]):
        assert list(result.token_ids) == case["output_ids"] and result.text == case["text"]


def test_max_concurrency_1_runs_one_at_a_time_with_the_same_tokens(model: Any, golden: dict[str, Any]) -> None:
    recorder = BatchRecorder(model)
    engine = engine_for(recorder, max_concurrency=1)
    try:
        handles = [engine.submit(golden_request(case)) for case in golden["cases"]]
        assert engine.waiting == len(golden["cases"]) - 1
        for case, handle in zip(golden["cases"], handles, strict=True):
            assert list(handle.result().token_ids) == case["output_ids"]
    finally:
        engine.close()
    assert set(recorder.batch_sizes) == {1}


# --------------------------------------------------------------------------- leaving mid-batch


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(model: Any, golden: dict[str, Any]) -> None:
    slow = ThrottledManager(model, step_s=0.01)
    engine = engine_for(slow)
    case = golden["cases"][0]
    try:
        long = engine.submit(with_tokens(case, 300))
        others = [engine.submit(golden_request(c)) for c in golden["cases"][1:3]]
        assert wait_until(lambda: slow.running == 3)
        assert wait_until(lambda: slow.events > 12)
        long.cancel()
        with pytest.raises(ClientGone):
            for _ in long:
                pass
        for c, handle in zip(golden["cases"][1:3], others, strict=True):
            assert list(handle.result().token_ids) == c["output_ids"]
        assert wait_until(lambda: engine.active == 0)
    finally:
        slow.release()
        engine.close()
    assert min(slow.finished) < 300, "the cancelled sequence stopped early"


def test_a_deadline_mid_batch_ends_that_request_only(model: Any, golden: dict[str, Any]) -> None:
    slow = ThrottledManager(model, step_s=0.01)
    engine = engine_for(slow)
    try:
        doomed = engine.submit(with_tokens(golden["cases"][0], 600), deadline=time.monotonic() + 0.5)
        other = engine.submit(with_tokens(golden["cases"][1], 24))
        with pytest.raises(DeadlineExceeded):
            doomed.result()
        assert list(other.result().token_ids) == golden["cases"][1]["output_ids"]
    finally:
        slow.release()
        engine.close()


def test_a_sequence_finishing_frees_its_slot_for_the_queue(model: Any, golden: dict[str, Any]) -> None:
    engine = engine_for(model, max_concurrency=2)
    try:
        handles = [engine.submit(with_tokens(case, 4 + 3 * i)) for i, case in enumerate(golden["cases"])]
        for i, (case, handle) in enumerate(zip(golden["cases"], handles, strict=True)):
            assert list(handle.result().token_ids) == expected(case, 4 + 3 * i)
        assert engine.active == 0 and engine.waiting == 0
    finally:
        engine.close()


def test_streamed_deltas_join_to_the_result(model: Any, golden: dict[str, Any]) -> None:
    engine = engine_for(model)
    try:
        handles = [engine.submit(golden_request(case)) for case in golden["cases"]]
        for case, handle in zip(golden["cases"], handles, strict=True):
            deltas, results = [], []
            for event in handle:
                (deltas if isinstance(event, TextDelta) else results).append(event)
            assert len(results) == 1 and isinstance(results[0], GenerationResult)
            assert "".join(d.text for d in deltas) == results[0].text == case["text"]
    finally:
        engine.close()


# --------------------------------------------------------------------------- the KV budget


def test_a_full_kv_slot_clamps_the_answer_and_refuses_a_prompt_that_cannot_fit(
    model: Any, golden: dict[str, Any]
) -> None:
    case = golden["cases"][0]
    prompt = len(case["input_ids"])
    engine = Engine(model, AdmissionSettings(max_concurrency=2, kv_cache_tokens=2 * (prompt + 10)))
    try:
        assert engine.slot_tokens == prompt + 10
        result = engine.submit(golden_request(case)).result()  # asks for 24; the slot has room for 10
        assert result.finish_reason is FinishReason.LENGTH
        assert list(result.token_ids) == case["output_ids"][:10] and result.max_new_tokens == 10
        long = GenerationRequest([{"role": "user", "content": "word " * (prompt + 20)}])
        with pytest.raises(InputError, match="a KV slot holds"):
            engine.submit(long).result()
        assert engine.active == 0
    finally:
        engine.close()


def test_the_default_concurrency_is_what_the_budget_allows_and_at_least_4(model: Any) -> None:
    context = model.spec.text.context_length  # the tiny model's: 1024, so each request may need all of it
    small = Engine(model, AdmissionSettings(kv_cache_tokens=2 * context))
    large = Engine(model, AdmissionSettings(kv_cache_tokens=10 * context))
    try:
        assert small.max_concurrency == 4 and small.slot_tokens == context // 2
        assert large.max_concurrency == 10 and large.slot_tokens == context
    finally:
        small.close()
        large.close()


# --------------------------------------------------------------------------- admission


def test_a_full_queue_is_refused_at_once_and_a_cancelled_waiter_leaves_it(model: Any, golden: dict[str, Any]) -> None:
    held = ThrottledManager(model, step_s=TIMEOUT)
    engine = Engine(held, AdmissionSettings(max_concurrency=1, max_queue=1))
    try:
        running = engine.submit(golden_request(golden["cases"][0]))
        assert held.first_event.wait(TIMEOUT)
        waiting = engine.submit(golden_request(golden["cases"][1]))
        assert engine.waiting == 1
        refused = engine.submit(golden_request(golden["cases"][2]))
        with pytest.raises(Exception, match="server busy: 1 generations running, 1 waiting"):
            refused.result()
        waiting.cancel()
        assert engine.waiting == 0, "its place went with the cancel, in the same thread"
        with pytest.raises(ClientGone):
            waiting.result()
        held.release()
        assert list(running.result().token_ids) == golden["cases"][0]["output_ids"]
    finally:
        held.release()
        engine.close()


class JoinOrder(ThrottledManager):
    """The held model, recording the order in which sequences join the batch (by their budget)."""

    def __init__(self, model: Any, step_s: float) -> None:
        super().__init__(model, step_s)
        self.joined: list[int] = []

    def prefill(self, prepared: Any, cache: Any, slot: int, chunk_tokens: int) -> Any:
        self.joined.append(prepared.max_new_tokens)
        return super().prefill(prepared, cache, slot, chunk_tokens)


def test_a_slot_freed_goes_to_the_head_of_the_queue(model: Any, golden: dict[str, Any]) -> None:
    held = JoinOrder(model, step_s=TIMEOUT)
    engine = Engine(held, AdmissionSettings(max_concurrency=1, max_queue=2))
    try:
        first = engine.submit(with_tokens(golden["cases"][0], 3))
        assert held.first_event.wait(TIMEOUT)
        second = engine.submit(with_tokens(golden["cases"][1], 4))
        third = engine.submit(with_tokens(golden["cases"][2], 5))
        assert engine.waiting == 2
        held.release()
        for handle in (first, second, third):
            handle.result()
        assert held.joined == [3, 4, 5], "each freed slot went to the oldest waiter"
    finally:
        held.release()
        engine.close()


def test_shutdown_refuses_new_and_waiting_requests_and_cancel_all_stops_running_ones(
    model: Any, golden: dict[str, Any]
) -> None:
    held = ThrottledManager(model, step_s=TIMEOUT)
    engine = Engine(held, AdmissionSettings(max_concurrency=1, max_queue=1))
    try:
        running = engine.submit(golden_request(golden["cases"][0]))
        assert held.first_event.wait(TIMEOUT)
        waiting = engine.submit(golden_request(golden["cases"][1]))
        engine.begin_shutdown()
        with pytest.raises(Exception, match="shutting down"):
            waiting.result()
        with pytest.raises(Exception, match="shutting down"):
            engine.submit(golden_request(golden["cases"][2])).result()
        engine.cancel_all()
        held.release()
        with pytest.raises(Exception, match="the generation was cancelled"):
            running.result()
        assert engine.wait_idle(TIMEOUT)
    finally:
        held.release()
        engine.close()
