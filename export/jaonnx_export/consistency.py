"""Checks that the checkpoint's files agree with each other and with the recipe, at export.

Each failure is one line naming the file and the fix; what passes is recorded in the
manifest's `checks`, so an artifact says what was verified about its source.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from jaonnx.errors import JaonnxError
from jaonnx.recipes import Recipe
from jaonnx.tokenization import Backend

from .sources import Source, generation_config, read_json

# generation_config.json keys that have a recipe default of the same meaning.
GENERATION_KEYS = ("do_sample", "max_new_tokens", "min_new_tokens", "max_length", "min_length", "temperature",
                   "top_k", "top_p", "repetition_penalty", "num_return_sequences")


def check_vocab(source: Source, config_vocab: int, tokenizer_size: int) -> dict[str, Any]:
    """The embedding table must cover every id the tokenizer emits; a larger (padded) table is
    fine, and the runtime masks the logits of ids the tokenizer cannot decode."""
    if config_vocab < tokenizer_size:
        raise JaonnxError(
            f"{source.directory / 'config.json'} has vocab_size {config_vocab} but the tokenizer has "
            f"{tokenizer_size} ids: the checkpoint's config and tokenizer do not belong together; re-download it"
        )
    return {"config_vocab_size": config_vocab, "tokenizer_size": tokenizer_size,
            "masked_logits": config_vocab - tokenizer_size}


def special_ids(source: Source, recipe: Recipe, backend: Backend, config: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """Ids of the recipe's special tokens, read from the tokenizer. Only the roles the task uses
    must exist, and each must agree with special_tokens_map.json.

    Where config.json's `<role>_token_id` disagrees with the tokenizer, the tokenizer wins: the
    model cards pass pad/bos/eos from the tokenizer to `generate`, so that is how the model
    runs in transformers. The disagreement is recorded (`special_ids_overridden`) and
    `describe_special` words the warning."""
    used = recipe.roles_used()
    declared = read_json(source.directory / "special_tokens_map.json")
    ids: dict[str, int] = {}
    skipped: list[str] = []
    overridden: dict[str, dict[str, int]] = {}
    for role, token in recipe.special.items():
        named = declared.get(f"{role}_token")
        named = named.get("content") if isinstance(named, dict) else named
        if isinstance(named, str) and named != token and role in used:
            raise JaonnxError(
                f"{source.directory / 'special_tokens_map.json'} names {named!r} as the {role} token but recipe "
                f"{recipe.id} uses {token!r}: pass the right --recipe or fix the file"
            )
        token_id = backend.piece_to_id(token)
        if token_id is None:
            if role in used:
                raise JaonnxError(
                    f"the tokenizer of {source.name} has no {token!r} ({role}), which recipe {recipe.id} needs: "
                    "pass the right --recipe or fix the tokenizer"
                )
            skipped.append(role)
            continue
        configured = getattr(config, f"{role}_token_id", None)
        if isinstance(configured, int) and not isinstance(configured, bool) and configured != token_id:
            overridden[role] = {"config": configured, "tokenizer": token_id, "token": token}
        ids[role] = token_id
    found: dict[str, Any] = {"special_tokens_checked": list(used), "special_tokens_absent": skipped}
    if overridden:
        found["special_ids_overridden"] = {
            "roles": overridden,
            "used": "tokenizer (the model card passes pad/bos/eos from the tokenizer to generate)",
        }
    return ids, found


def describe_special(source: Source, report: dict[str, Any]) -> str | None:
    """One warning line naming every config.json id the tokenizer overrode, or None."""
    roles = report.get("special_ids_overridden", {}).get("roles")
    if not roles:
        return None
    parts = ", ".join(f"{role}_token_id {v['config']} but the tokenizer's {v['token']!r} is {v['tokenizer']}"
                      for role, v in roles.items())
    return (f"{source.directory / 'config.json'} has {parts}: using the tokenizer's "
            f"{'id' if len(roles) == 1 else 'ids'}, as the model card does (recorded in jaonnx.json)")


def generation_report(source: Source, recipe: Recipe) -> dict[str, Any]:
    """Where the checkpoint's generation_config.json differs from the recipe's card defaults.

    The card's settings stay the defaults (they are what the model card documents); the
    difference is reported so nobody is surprised."""
    found = generation_config(source)
    if not found or recipe.task != "text-generation":
        return {}
    defaults = asdict(recipe.generation)
    differs = {
        key: {"generation_config": found[key], "recipe": defaults[key]}
        for key in GENERATION_KEYS
        if key in found and found[key] != defaults[key]
    }
    return {"generation_config": {"differs_from_recipe": differs, "used": "recipe (the card's settings)"}}


def describe_generation(report: dict[str, Any]) -> str | None:
    """One progress line for the generation_config comparison, or None when there is none."""
    differs = report.get("generation_config", {}).get("differs_from_recipe")
    if differs is None:
        return None
    if not differs:
        return "generation_config.json agrees with the recipe's card defaults"
    parts = ", ".join(f"{k}={v['generation_config']!r} (card {v['recipe']!r})" for k, v in differs.items())
    return f"generation_config.json differs from the card defaults, which stay in use: {parts}"
