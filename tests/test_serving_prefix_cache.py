"""Prefix caching and chunked prefill over HTTP: requests sharing a long prefix get
transformers' greedy ids, `/metrics` counts the prefix-cache queries and hits (vLLM's names
with our prefix) by exactly the prompt tokens sent, and `jaonnx serve` has the switches."""

from __future__ import annotations

import httpx
import torch
from conftest import run_cli
from helpers import hf_model

from serving_support import need, running_server

need("fastapi", "serve")
need("prometheus_client", "serve")

from test_serving_metrics import delta, scrape  # noqa: E402

GPT = "gpt2-small-ja"
PREFIX = "近年の機械学習は急速に進歩しているが、その一方で大学の研究者は" * 3
SUFFIXES = ["東京の天気は", "オリンピックは"]


def test_shared_prefix_requests_are_correct_and_counted(artifacts, twins_dir):
    model = hf_model(twins_dir / GPT)
    with running_server([artifacts[GPT]], max_prefill_tokens=16) as (url, app):
        before = scrape(url)
        results = []
        for suffix in SUFFIXES:
            r = httpx.post(url + "/v1/generate", json={"model": GPT, "prompt": PREFIX + suffix, "max_new_tokens": 8,
                                                       "do_sample": False}, timeout=60)
            assert r.status_code == 200, r.text
            results.append(r.json()["results"][0])
        after = scrape(url)
    for got in results:
        with torch.no_grad():
            ids = got["prompt_ids"]
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert got["generated_ids"][: len(out[0]) - len(ids)] == out[0, len(ids):].tolist()
    prompt_tokens = sum(len(g["prompt_ids"]) for g in results)
    assert delta(before, after, "jaonnx:prefix_cache_queries_total", model_name=GPT) == prompt_tokens
    hits = delta(before, after, "jaonnx:prefix_cache_hits_total", model_name=GPT)
    assert 16 <= hits < len(results[1]["prompt_ids"])  # the second request reused whole blocks of the first
    held = delta({}, after, "jaonnx:prefix_cache_bytes", model_name=GPT)
    assert held > 0 and held % (16 * app.state.served[GPT].model.new_batch().io.token_bytes()) == 0  # whole blocks


def test_no_prefix_cache_counts_no_hits(artifacts):
    with running_server([artifacts[GPT]], prefix_cache=False, max_prefill_tokens=None) as (url, _):
        for suffix in SUFFIXES:
            r = httpx.post(url + "/v1/generate", json={"model": GPT, "prompt": PREFIX + suffix, "max_new_tokens": 2,
                                                       "do_sample": False}, timeout=60)
            assert r.status_code == 200, r.text
        after = scrape(url)
    assert delta({}, after, "jaonnx:prefix_cache_hits_total", model_name=GPT) == 0


def test_serve_has_the_prefill_and_prefix_cache_options():
    from typer.main import get_command

    from jaonnx.cli import app

    assert run_cli("serve", "--help").exit_code == 0
    serve = get_command(app).commands["serve"]
    options = {o for p in serve.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
    assert {"--max-prefill-tokens", "--prefix-cache", "--no-prefix-cache", "--prefix-cache-mb"} <= options
