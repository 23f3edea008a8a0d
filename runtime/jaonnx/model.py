"""What every task object shares: the artifact's manifest, recipe, tokenizer and ORT session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifact import Manifest
from .errors import JaonnxError
from .page_release import release_load_only_pages
from .session import Providers, create_session
from .tokenization import RecipeTokenizer


class ArtifactModel:
    task = ""

    def __init__(self, directory: Path, manifest: Manifest, providers: Providers = "auto", **session_options: Any):
        self.directory = Path(directory)
        self.manifest = manifest
        self.recipe = manifest.recipe_obj
        self.tokenizer = RecipeTokenizer.from_file(
            self.recipe, self.directory / manifest.tokenizer_file, manifest.special_ids
        )
        self._check_tokenizer()
        direct = bool(manifest.ort_fixed_point and manifest.external_data)
        if direct:
            # ORT's passes change nothing and the weights are mapped from the artifact's data file:
            # a cache entry would only copy them. (Inline weights still gain a mapped copy from it.)
            session_options["cache"] = False
        self.session = create_session(self.directory / manifest.model_file, providers, **session_options)
        if direct and manifest.load_only_data and self.session.get_providers()[0] == "CPUExecutionProvider":
            # the session maps the artifact's own data file (no cache entry): its offsets are the manifest's
            release_load_only_pages(self.directory / str(manifest.external_data), manifest.load_only_data)
        self._check_graph()
        self.pad_id = manifest.special_ids.get("pad", 0)

    def _check_graph(self) -> None:
        """The graph's inputs and outputs must be the ones the manifest lists, and its fixed
        dimensions the sizes it records: a manifest value that loads but is wrong would
        otherwise fail deep in ONNX Runtime, or silently mask the wrong logits."""
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if (sorted(names[0]), sorted(names[1])) != (sorted(self.manifest.inputs), sorted(self.manifest.outputs)):
            raise JaonnxError(
                f"{self.directory / self.manifest.model_file} does not have the inputs and outputs "
                f"{self.directory / 'jaonnx.json'} lists: re-run `jaonnx export`"
            )
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        m = self.manifest
        expected = {"vocab_size": (shapes.get("logits", [None])[-1], m.vocab_size)}
        if m.decoder is not None:
            present = [shapes[n] for n in shapes if n.startswith("present.")]
            expected["decoder.num_layers"] = (len(present) // 2, m.decoder.num_layers)
            if present and len(present[0]) == 4:
                expected["decoder.num_heads"] = (present[0][1], m.decoder.num_heads)
                expected["decoder.head_dim"] = (present[0][3], m.decoder.head_dim)
        for field, (graph, recorded) in expected.items():
            if isinstance(graph, int) and graph != recorded:
                raise JaonnxError(
                    f"manifest.{field} is {recorded} but {m.model_file} has {graph}: the artifact is corrupt, "
                    "re-run `jaonnx export`", field,
                )

    def _check_tokenizer(self) -> None:
        """The tokenizer file must be the one the manifest describes (ids in range, same size)."""
        size = self.tokenizer.vocab_size
        recorded = self.manifest.tokenizer_size
        where = self.directory / self.manifest.tokenizer_file
        if recorded is not None and recorded != size:
            raise JaonnxError(f"{where} has {size} ids but the manifest says {recorded}: re-run `jaonnx export`")
        bad = {role: i for role, i in self.manifest.special_ids.items() if not 0 <= i < size}
        if bad:
            raise JaonnxError(f"special ids {bad} are outside {where}'s {size} ids: re-run `jaonnx export`")
