"""What every task object shares: the artifact's manifest, recipe, tokenizer and ORT session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifact import Manifest
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
        self.session = create_session(self.directory / manifest.model_file, providers, **session_options)
        self.pad_id = manifest.special_ids.get("pad", 0)
