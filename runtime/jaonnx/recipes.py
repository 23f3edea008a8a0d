"""Every per-model fact in one place.

A recipe says how a model must be tokenized, laid out, positioned and decoded so that it
behaves the way its model card says. Adding a model means adding a `Recipe` here (plus a
twin builder); no other module branches on the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import JaonnxError
from .typecheck import build

Task = Literal["fill-mask", "text-generation"]
Backend = Literal["sentencepiece", "tokenizers"]
Normalizer = Literal["lowercase", "fullwidth"]


@dataclass(frozen=True)
class SpecialTokens:
    """Surface strings of the special tokens; ids are read from the tokenizer at export."""

    unk: str | None = None
    pad: str | None = None
    bos: str | None = None
    eos: str | None = None
    cls: str | None = None
    sep: str | None = None
    mask: str | None = None

    def items(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.__dict__.items() if v is not None]


@dataclass(frozen=True)
class GenerationDefaults:
    """Decoding settings from the model card; every one can be overridden per call."""

    do_sample: bool = True
    max_new_tokens: int = 50
    min_new_tokens: int = 0
    # Totals including the prompt, as transformers' max_length/min_length; when set they win
    # over max_new_tokens/min_new_tokens unless the caller passes those explicitly.
    max_length: int | None = None
    min_length: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    bad_words: tuple[str, ...] = ()  # special-token roles ("unk") or surface strings


@dataclass(frozen=True)
class Recipe:
    id: str
    hub_id: str
    task: Task
    architecture: str  # transformers model class
    tokenizer_class: str  # transformers tokenizer class the card uses (reference + detection)
    tokenizer_backend: Backend
    tokenizer_file: str  # file the runtime reads, inside the artifact
    special: SpecialTokens
    normalizers: tuple[Normalizer, ...] = ()
    prefix: tuple[str, ...] = ()  # special-token roles put before the text, e.g. ("cls",)
    suffix: tuple[str, ...] = ()  # special-token roles put after the text, e.g. ("sep",)
    strip_typed: tuple[str, ...] = ()  # roles a user may type at the start; removed before encoding
    position_start: int = 0  # first position id; baked into the exported graph
    token_type_ids: bool = False  # model has a segment embedding (fed all zeros)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    # `jaonnx export --quantize int4` without --int4-block: MatMulNBits' block along K, chosen per
    # shape by measurement (README "Which precision per task"): 32 where the kernel's compute shows (small
    # models), 128 where reading the weights dominates (japanese-gpt-1b: fewer bytes per weight).
    int4_block: int = 32
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON data: what an artifact's manifest records (format 2)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Rebuild a recipe recorded in a manifest; a bad field raises typecheck.FieldError."""
        return build(cls, data, where)

    def roles_used(self) -> tuple[str, ...]:
        """The special-token roles this recipe's task reads; only these must exist at export."""
        if self.task == "fill-mask":
            roles = ("mask", *self.prefix, *self.suffix, *self.strip_typed)
        else:
            roles = ("eos", *(w for w in self.generation.bad_words if w in SpecialTokens.__dataclass_fields__))
        return tuple(dict.fromkeys(r for r in roles if getattr(self.special, r) is not None))


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    RECIPES[recipe.id] = recipe
    return recipe


register(
    Recipe(
        id="rinna-roberta",
        hub_id="rinna/japanese-roberta-base",
        task="fill-mask",
        architecture="RobertaForMaskedLM",
        tokenizer_class="T5Tokenizer",
        tokenizer_backend="sentencepiece",
        tokenizer_file="spiece.model",
        special=SpecialTokens(
            unk="<unk>", bos="<s>", eos="</s>", pad="[PAD]", cls="[CLS]", sep="[SEP]", mask="[MASK]"
        ),
        normalizers=("lowercase",),
        prefix=("cls",),
        strip_typed=("cls",),
        position_start=0,
        notes="[CLS] first and no [SEP]; positions from 0, not transformers' padding_idx + 1.",
    )
)

register(
    Recipe(
        id="ken11-albert",
        hub_id="ken11/albert-base-japanese-v1",
        task="fill-mask",
        architecture="AlbertForMaskedLM",
        tokenizer_class="AlbertTokenizerFast",
        # tokenizer.json is written at export by transformers itself, so the runtime applies
        # exactly the normalizer chain (lower-case, accents) that the checkpoint's config asks for.
        tokenizer_backend="tokenizers",
        tokenizer_file="tokenizer.json",
        special=SpecialTokens(unk="<unk>", pad="<pad>", cls="[CLS]", sep="[SEP]", mask="[MASK]"),
        prefix=("cls",),
        suffix=("sep",),
        strip_typed=("cls",),
        token_type_ids=True,
        notes="Typed [MASK] must not leave the lone '▁' the card deletes by hand.",
    )
)

register(
    Recipe(
        id="jmedroberta",
        hub_id="alabnii/jmedroberta-base-sentencepiece-vocab50000",
        task="fill-mask",
        architecture="BertForMaskedLM",
        tokenizer_class="PreTrainedTokenizerFast",
        tokenizer_backend="tokenizers",
        tokenizer_file="tokenizer.json",
        special=SpecialTokens(unk="[UNK]", pad="[PAD]", cls="[CLS]", sep="[SEP]", mask="[MASK]"),
        normalizers=("fullwidth",),
        prefix=("cls",),
        suffix=("sep",),
        strip_typed=("cls",),
        token_type_ids=True,
        notes="Input converted to full-width; no lone '▁' after [MASK].",
    )
)

register(
    Recipe(
        id="rinna-gpt-1b",
        hub_id="rinna/japanese-gpt-1b",
        task="text-generation",
        architecture="GPT2LMHeadModel",
        tokenizer_class="T5Tokenizer",
        tokenizer_backend="sentencepiece",
        tokenizer_file="spiece.model",
        special=SpecialTokens(
            pad="[PAD]", unk="<unk>", bos="<s>", eos="</s>", cls="[CLS]", sep="[SEP]", mask="[MASK]"
        ),
        generation=GenerationDefaults(
            do_sample=True, max_length=100, min_length=100, top_k=500, top_p=0.95,
            bad_words=("unk",),
        ),
        int4_block=128,
        notes="Prompts encoded with add_special_tokens=False; card samples to max_length=min_length=100.",
    )
)

register(
    Recipe(
        id="gpt2-small-ja",
        hub_id="colorfulscoop/gpt2-small-ja",
        task="text-generation",
        architecture="GPT2LMHeadModel",
        tokenizer_class="BertGenerationTokenizer",
        tokenizer_backend="sentencepiece",
        tokenizer_file="spiece.model",
        special=SpecialTokens(pad="<pad>", unk="<unk>", bos="<s>", eos="</s>"),
        generation=GenerationDefaults(do_sample=True, top_k=50, top_p=0.95, num_return_sequences=3),
        notes="BertGenerationTokenizer adds no special tokens; add_dummy_prefix is on.",
    )
)


def get_recipe(recipe_id: str) -> Recipe:
    """Look a recipe up by id or by hub id."""
    if recipe_id in RECIPES:
        return RECIPES[recipe_id]
    for recipe in RECIPES.values():
        if recipe.hub_id == recipe_id:
            return recipe
    known = ", ".join(sorted(RECIPES))
    raise JaonnxError(f"unknown recipe {recipe_id!r}: use one of {known}")


def recipe_for_hub_id(hub_id: str) -> Recipe | None:
    return next((r for r in RECIPES.values() if r.hub_id == hub_id), None)


def detect_recipe(architecture: str | None, tokenizer_class: str | None) -> Recipe:
    """Pick the recipe a checkpoint directory describes, when exactly one fits."""
    tok = (tokenizer_class or "").removesuffix("Fast")
    fits = [
        r
        for r in RECIPES.values()
        if r.architecture == architecture and (not tok or r.tokenizer_class.removesuffix("Fast") == tok)
    ]
    if len(fits) == 1:
        return fits[0]
    known = ", ".join(sorted(RECIPES))
    raise JaonnxError(
        f"cannot tell the recipe from architecture={architecture!r} tokenizer={tokenizer_class!r}: "
        f"pass --recipe (one of {known})"
    )
