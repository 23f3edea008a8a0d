"""Scale-out: the app as a Ray Serve deployment with 2 replicas on a local Ray instance;
requests are spread across both, and answers equal the Python API's."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import jaonnx
from serving_support import free_port, need, same_predictions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use
ray = need("ray", "ray")


RAY_KEY = "ray-key-1"  # the deployment takes the same API keys as `jaonnx serve`
AUTH = {"Authorization": f"Bearer {RAY_KEY}"}


@pytest.fixture(scope="module")
def ray_url(artifacts: dict[str, Path]) -> Any:
    from ray import serve

    from jaonnx.serving.ray_serve import run

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False,
             configure_logging=False)
    try:
        port = free_port()
        run([artifacts["ken11-albert"], artifacts["gpt2-small-ja"]], host="127.0.0.1", port=port, blocking=False,
            num_replicas=2, num_cpus=0.5, max_batch_size=8, api_keys=(RAY_KEY,))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_share_the_requests(ray_url: str, artifacts: dict[str, Path]) -> None:
    fm = jaonnx.load(artifacts["ken11-albert"])
    texts = [t.format(fm.mask_token) for t in ["東京は日本の{}です。", "大学で{}の研究をしています。"] * 16]
    assert httpx.get(ray_url + "/v1/models", timeout=60).status_code == 401
    with httpx.Client(base_url=ray_url, timeout=60, headers=AUTH) as client:
        def call(text: str) -> httpx.Response:
            return client.post("/v1/fill-mask", json={"model": "ken11-albert", "inputs": text, "top_k": 3})

        pids: set[str] = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(call, texts))
            for text, r in zip(texts, responses):
                assert r.status_code == 200, r.text
                same_predictions(r.json()["results"], fm(text, top_k=3))
                pids.add(r.headers["x-jaonnx-pid"])
        assert len(pids) == 2, pids
        gen = jaonnx.load(artifacts["gpt2-small-ja"])
        r = client.post("/v1/generate", json={"model": "gpt2-small-ja", "prompt": "東京は", "max_new_tokens": 8,
                                              "do_sample": False})
        want = gen.generate("東京は", max_new_tokens=8, do_sample=False, return_ids=True)
        assert r.json()["results"][0]["generated_ids"] == want.generated_ids
        bad = client.post("/v1/fill-mask", json={"model": "ken11-albert", "inputs": "no mask"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "inputs"


def test_autoscaling_settings_reach_the_deployment(artifacts: dict[str, Path]) -> None:
    from jaonnx.serving.ray_serve import autoscaling_config, build

    app = build([artifacts["ken11-albert"]], autoscaling=autoscaling_config(1, 4))
    deployment = app._bound_deployment
    assert deployment._deployment_config.autoscaling_config.min_replicas == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
