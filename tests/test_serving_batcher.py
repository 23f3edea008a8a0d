"""The batching workers without HTTP: continuous batching lets a request join a running batch
between decode steps and leave it when done, with the same tokens as when it runs alone."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import pytest

import jaonnx
from jaonnx.serving.batcher import FillMaskJob, FillMaskWorker, GenerationJob, GenerationWorker, QueueFull


def job(gen: Any, prompt: str, events: queue.Queue[Any], **options: Any) -> GenerationJob:
    return GenerationJob(sink=events.put, inputs=gen.process(prompt, **options))


def next_event(events: queue.Queue[Any], timeout: float = 60) -> tuple[str, Any]:
    """The next event other than "first_token" (sent once per job, for the metrics)."""
    while True:
        kind, payload = events.get(timeout=timeout)
        if kind != "first_token":
            return kind, payload


def result(events: queue.Queue[Any]) -> Any:
    while True:
        kind, payload = next_event(events)
        if kind != "piece":
            assert kind == "result", (kind, payload)
            return payload


@pytest.fixture(scope="module")
def gen(artifacts: dict[str, Path]) -> Any:
    return jaonnx.load(artifacts["rinna-gpt-1b"])


def test_a_request_joins_and_leaves_a_running_batch(gen: Any) -> None:
    worker = GenerationWorker("g", gen, max_queue=4, max_batch=8)
    try:
        long_events: queue.Queue[Any] = queue.Queue()
        short_events: queue.Queue[Any] = queue.Queue()
        worker.submit(job(gen, "東京は日本の", long_events, max_new_tokens=80, min_new_tokens=80, do_sample=False))
        deadline = time.monotonic() + 30
        while worker.stats.tokens < 5:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        worker.submit(job(gen, "近年の機械学習は", short_events, max_new_tokens=6, do_sample=False))
        short = result(short_events)
        deadline = time.monotonic() + 5
        while worker.stats.active_rows != 1:  # the short one left the batch...
            assert time.monotonic() < deadline, worker.stats
            time.sleep(0.001)
        assert [e[0] for e in list(long_events.queue)] == ["first_token"]  # no result yet: the long one
        assert worker.stats.tokens < 80  # still runs
        long = result(long_events)
    finally:
        worker.stop()
    assert worker.stats.max_batch_seen == 2 and worker.stats.max_requests_seen == 2
    want_short = gen.generate("近年の機械学習は", max_new_tokens=6, do_sample=False, return_ids=True)
    want_long = gen.generate("東京は日本の", max_new_tokens=80, min_new_tokens=80, do_sample=False, return_ids=True)
    assert short[0].generated_ids == want_short.generated_ids and short[0].text == want_short.text
    assert long[0].generated_ids == want_long.generated_ids


def test_one_request_with_two_prompts_is_not_counted_as_batched(gen: Any) -> None:
    """Two rows in a step are not two requests sharing it: `max_requests_seen` counts requests."""
    worker = GenerationWorker("g", gen, max_queue=2, max_batch=4)
    try:
        events: queue.Queue[Any] = queue.Queue()
        worker.submit(GenerationJob(sink=events.put, inputs=gen.process(["東京は", "今日は"], max_new_tokens=3,
                                                                          do_sample=False)))
        got = result(events)
    finally:
        worker.stop()
    assert [r.prompt for r in got] == ["東京は", "今日は"]
    assert worker.stats.max_batch_seen == 2 and worker.stats.max_requests_seen == 1


def test_streamed_pieces_join_to_the_text_and_cancel_stops(gen: Any) -> None:
    worker = GenerationWorker("g", gen, max_queue=2, max_batch=4)
    try:
        events: queue.Queue[Any] = queue.Queue()
        streamed = job(gen, "今日は", events, max_new_tokens=12, do_sample=False)
        streamed.stream = True
        worker.submit(streamed)
        pieces = []
        while True:
            kind, payload = next_event(events)
            if kind == "result":
                break
            pieces.append(payload.text)
        assert "".join(pieces) == payload[0].text
        cancelled_events: queue.Queue[Any] = queue.Queue()
        doomed = job(gen, "今日は", cancelled_events, max_new_tokens=100, min_new_tokens=100, do_sample=False)
        worker.submit(doomed)
        doomed.cancel()
        assert next_event(cancelled_events, timeout=30)[0] == "cancelled"
    finally:
        worker.stop()


def test_fill_mask_batches_and_the_queue_is_bounded(artifacts: dict[str, Path]) -> None:
    fm = jaonnx.load(artifacts["jmedroberta"])
    worker = FillMaskWorker("f", fm, max_queue=3, max_batch=8, max_wait_s=0.5)
    try:
        events: queue.Queue[Any] = queue.Queue()
        texts = [f"東京は{fm.mask_token}です。", f"大学で{fm.mask_token}の研究", f"{fm.mask_token}は美しい。"]
        for t in texts:
            worker.submit(FillMaskJob(sink=events.put, inputs=[t], top_k=2))
        with pytest.raises(QueueFull):  # three wait (the worker holds the first for 0.5 s to fill up)
            for _ in range(4):
                worker.submit(FillMaskJob(sink=events.put, inputs=[texts[0]], top_k=2))
        got = [events.get(timeout=30) for _ in range(worker.stats.submitted)]
    finally:
        worker.stop()
    assert all(kind == "result" for kind, _ in got)
    assert worker.stats.max_batch_seen >= 3 and worker.stats.rejected >= 1
