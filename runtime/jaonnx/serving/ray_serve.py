"""Scale-out on Ray Serve: the same FastAPI app, one copy per replica, behind Ray's proxy.

Each replica loads every artifact and runs its own batching workers; Ray spreads requests
across replicas and (with `autoscaling`) adds or removes replicas with the load.

    # one machine
    jaonnx serve --ray --replicas 2 artifacts/rinna-roberta artifacts/gpt2-small-ja
    # a multi-node cluster: `ray start --head` on one node, `ray start --address=HEAD:6379` on
    # the others, artifacts at the same path on every node (or a shared filesystem), then on any node
    jaonnx serve --ray --ray-address auto --min-replicas 1 --max-replicas 8 --host 0.0.0.0 ART [ART ...]

From Python: `serve.run(jaonnx.serving.ray_serve.build(["artifacts/gpt2-small-ja"], num_replicas=2))`.
`ray` is imported lazily: nothing here is needed unless you scale out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def autoscaling_config(min_replicas: int, max_replicas: int, target_ongoing_requests: float = 8.0) -> dict[str, Any]:
    """Ray Serve autoscaling: scale on ongoing requests per replica (batching wants a few)."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 60.0,
    }


def build(
    artifact_dirs: Sequence[str | Path],
    *,
    num_replicas: int | None = 1,
    autoscaling: dict[str, Any] | None = None,
    num_cpus: float = 1.0,
    max_ongoing_requests: int = 256,
    name: str = "jaonnx",
    **serve_options: Any,
) -> Any:
    """A bound Ray Serve application of `create_app(artifact_dirs, **serve_options)`.

    Paths are resolved here, on the driver: every node must see the artifacts at the same path."""
    from ray import serve

    dirs = [str(Path(p).resolve()) for p in artifact_dirs]

    @serve.ingress()
    class JaonnxReplica:
        def __init__(self, artifact_dirs: list[str], options: dict[str, Any]) -> None:
            self.artifact_dirs = artifact_dirs
            self.options = options

        def __serve_build_asgi_app__(self) -> Any:
            from jaonnx.serving.app import create_app

            return create_app(self.artifact_dirs, **self.options)

    deployment_options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": num_cpus},
        "max_ongoing_requests": max_ongoing_requests,
    }
    if autoscaling:
        deployment_options["autoscaling_config"] = autoscaling
    else:
        deployment_options["num_replicas"] = num_replicas
    return serve.deployment(**deployment_options)(JaonnxReplica).bind(dirs, dict(serve_options))


def run(
    artifact_dirs: Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    blocking: bool = True,
    **build_options: Any,
) -> Any:
    """Start (or join, with `address`) Ray, deploy, and serve on HOST:PORT until interrupted."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    app = build(artifact_dirs, **build_options)
    return serve.run(app, name="jaonnx", route_prefix="/", blocking=blocking)
