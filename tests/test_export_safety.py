"""Export safety: atomic writes, consistency checks, the hub cache, quiet output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import assert_one_line_error, hf_tokenizer, jaonnx_cli

import jaonnx
from jaonnx.errors import JaonnxError
from jaonnx.recipes import get_recipe
from jaonnx.tokenization import load_backend


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_failed_export_leaves_the_previous_artifact(artifacts, twins_dir, tmp_path):
    """A re-export that fails its parity check changes nothing; --verbose shows third-party warnings."""
    out = tmp_path / "art"
    shutil.copytree(artifacts["gpt2-small-ja"], out)
    before = digest(out)
    proc = jaonnx_cli("export", str(twins_dir / "gpt2-small-ja"), "-o", str(out), "--parity-atol", "1e-12",
                      "--kv-cache", "concat", "--verbose", timeout=600)  # concat is traced: TracerWarnings
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: parity check failed"), proc.stderr
    assert "TracerWarning" in proc.stderr  # --verbose lets them through
    assert digest(out) == before
    assert leftovers(tmp_path) == []
    assert jaonnx.load(out).generate("今日は", max_new_tokens=3, do_sample=False)


def test_killed_export_leaves_the_previous_artifact(artifacts, twins_dir, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(artifacts["rinna-roberta"], out)
    before = digest(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaonnx", "export", str(twins_dir / "rinna-roberta"), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Wait (bounded) until the export has written into its scratch directory, then kill it.
        for _ in range(6000):
            scratch = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
            if scratch and any(scratch[0].iterdir()) or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the export finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert digest(out) == before
    assert jaonnx.load(out)("4年に1度[MASK]は開かれる。", top_k=1)


# A child process that runs the real export and SIGKILLs itself right after the swap (or,
# with the fallback forced, between its two renames), before any cleanup runs.
DIE_AFTER_EXCHANGE = """
import os, signal, sys
from jaonnx_export import staging
real = staging.exchange
def exchange_then_die(a, b):
    assert real(a, b), "this filesystem has no atomic exchange"
    os.kill(os.getpid(), signal.SIGKILL)
staging.exchange = exchange_then_die
from jaonnx_export.export import export
export(sys.argv[1], sys.argv[2])
"""

DIE_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from jaonnx_export import staging
staging.exchange = lambda a, b: False  # the fallback: two renames
real, calls = Path.rename, []
def rename_then_die(self, target):
    done = real(self, target)
    calls.append(target)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return done
Path.rename = rename_then_die
with staging.Staging(Path(sys.argv[1])) as stage:
    (stage.work / "jaonnx.json").write_text("new", encoding="utf-8")
    stage.commit()
"""


def complete(directory: Path) -> bool:
    """Every file the manifest names is there and the artifact loads."""
    manifest = jaonnx.read_manifest(directory)
    names = [manifest.model_file, manifest.tokenizer_file, *([manifest.external_data] if manifest.external_data else [])]
    return all((directory / n).is_file() for n in names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's; the fallback is tested below")
def test_export_killed_after_the_swap_leaves_the_new_artifact(artifacts, twins_dir, tmp_path):
    """Killed between the exchange and the cleanup: the output holds the new artifact (the
    old one sits in a leftover directory), and the next export of that output removes it."""
    from jaonnx_export.export import export

    out = tmp_path / "art"
    shutil.copytree(artifacts["ken11-albert"], out)  # the old artifact: another model
    proc = subprocess.run([sys.executable, "-c", DIE_AFTER_EXCHANGE, str(twins_dir / "rinna-roberta"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert jaonnx.read_manifest(out).recipe == "rinna-roberta" and complete(out)
    assert jaonnx.load(out)("4年に1度[MASK]は開かれる。", top_k=1)
    (left,) = leftovers(tmp_path)
    assert jaonnx.read_manifest(tmp_path / left).recipe == "ken11-albert"  # the old one, swapped out
    export(str(twins_dir / "ken11-albert"), out)
    assert leftovers(tmp_path) == []
    assert jaonnx.read_manifest(out).recipe == "ken11-albert" and complete(out)


def test_fallback_killed_between_its_renames_is_recovered(tmp_path):
    """Without an atomic exchange, a kill between the two renames leaves the old artifact in
    `.old-*`; the next export of that output puts it back before anything else."""
    from jaonnx_export.staging import Staging

    out = tmp_path / "art"
    out.mkdir()
    (out / "jaonnx.json").write_text("old", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", DIE_BETWEEN_RENAMES, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and len(leftovers(tmp_path)) == 2  # the documented window
    with Staging(out):
        assert (out / "jaonnx.json").read_text(encoding="utf-8") == "old"
        assert [p for p in leftovers(tmp_path) if p.startswith(".art.old-")] == []
    assert leftovers(tmp_path) == []


def test_leftovers_of_dead_exports_are_removed_and_live_ones_kept(tmp_path):
    from jaonnx_export.staging import Staging

    out = tmp_path / "art"
    out.mkdir()
    (out / "jaonnx.json").write_text("{}", encoding="utf-8")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f".art.partial-{dead.stdout.strip()}-abc", f".art.old-{dead.stdout.strip()}-def", ".art.partial-old",
             f".art.partial-{os.getppid()}-live", ".other.partial-1-x"]
    for name in names:
        (tmp_path / name).mkdir()
    with Staging(out) as stage:
        (stage.work / "jaonnx.json").write_text("new", encoding="utf-8")
        stage.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", names[3], names[4]])
    assert (out / "jaonnx.json").read_text(encoding="utf-8") == "new"


def test_swap_exchanges_two_directories_in_one_step(tmp_path):
    from jaonnx_export import staging

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a", encoding="utf-8"), (b / "x").write_text("b", encoding="utf-8")
    swapped = staging.exchange(a, b)
    if not sys.platform.startswith(("linux", "darwin")):
        assert swapped is False  # no exchange here: the two-rename fallback (tested above) runs
        return
    assert swapped, "renameat2/renamex_np is missing or the filesystem refuses RENAME_EXCHANGE"
    assert (a / "x").read_text(encoding="utf-8") == "b" and (b / "x").read_text(encoding="utf-8") == "a"


def test_output_that_is_not_an_artifact_is_refused(twins_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    proc = jaonnx_cli("export", str(twins_dir / "ken11-albert"), "-o", str(tmp_path))
    assert_one_line_error(proc, "is not a jaonnx artifact")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def place_in_hub_cache(twin: Path, home: Path, hub_id: str) -> Path:
    """huggingface_hub's cache layout: models--org--name/{snapshots/<rev>/..., refs/main}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + hub_id.replace("/", "--"))
    shutil.copytree(twin, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    return repo / "snapshots" / revision


def test_hub_id_resolves_offline_from_the_cache_quietly(twins_dir, tmp_path):
    """`jaonnx export rinna/japanese-roberta-base` with HF_HUB_OFFLINE=1 and the twin in the
    cache; its stderr is the step display only: no warnings, no progress bars."""
    home = tmp_path / "hf"
    place_in_hub_cache(twins_dir / "rinna-roberta", home, "rinna/japanese-roberta-base")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "COLUMNS": "200"}
    out = tmp_path / "art"
    proc = jaonnx_cli("export", "rinna/japanese-roberta-base", "-o", str(out), env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = jaonnx.read_manifest(out)
    assert manifest.source == "rinna/japanese-roberta-base" and manifest.recipe == "rinna-roberta"
    for step in ("loading rinna/japanese-roberta-base", "tracing the ONNX graph", "checking parity against PyTorch"):
        assert step in proc.stderr, proc.stderr
    for noise in ("Warning", "warn", "%|", "Loading weights", "it/s", "Traceback"):
        assert noise not in proc.stderr, proc.stderr


def _http_error(kind: type, status: int) -> Exception:
    import httpx

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    return kind("refused", response=response)


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda e: _http_error(e.GatedRepoError, 403), ("is gated", "HF_TOKEN")),
        (lambda e: _http_error(e.RepositoryNotFoundError, 404), ("was not found",)),
        (lambda e: _http_error(e.HfHubHTTPError, 401), ("refused access", "HF_TOKEN")),
        (lambda e: e.LocalEntryNotFoundError("not cached"), ("offline", "unreachable", "HF_HUB_OFFLINE")),
        (lambda e: __import__("httpx").ConnectError("no route"), ("offline", "unreachable")),
    ],
)
def test_hub_failures_have_their_own_one_line_errors(monkeypatch, make, needles):
    import huggingface_hub
    from huggingface_hub import errors

    from jaonnx_export import sources

    def fail(*args, **kwargs):
        raise make(errors)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(JaonnxError) as info:
        sources.resolve("rinna/japanese-roberta-base")
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_hub_download_fetches_only_what_export_reads(monkeypatch, tmp_path):
    import huggingface_hub

    from jaonnx_export import sources

    calls = []
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")

    def fake(hub_id, allow_patterns=None):
        calls.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    sources.resolve("rinna/japanese-gpt-1b")
    # no safetensors came down: the PyTorch pickle is fetched as a fallback, nothing else
    assert calls == [sources.ALLOW_PATTERNS, sources.FALLBACK_PATTERNS]
    assert not any(p.endswith((".h5", ".msgpack", ".onnx", ".ot")) for p in sources.ALLOW_PATTERNS)
    calls.clear()
    (tmp_path / "model.safetensors").write_bytes(b"")
    sources.resolve("rinna/japanese-gpt-1b")
    assert calls == [sources.ALLOW_PATTERNS]


# ---- consistency checks (unit level: a checkpoint that disagrees with itself) ----


def _source(twins_dir: Path, tmp_path: Path, recipe: str):
    from jaonnx_export.sources import Source

    twin = tmp_path / recipe
    shutil.copytree(twins_dir / recipe, twin)
    return Source(twin, get_recipe(recipe), str(twin))


def test_config_vocab_smaller_than_the_tokenizer_is_refused(twins_dir, tmp_path):
    from jaonnx_export import consistency

    source = _source(twins_dir, tmp_path, "gpt2-small-ja")
    with pytest.raises(JaonnxError, match="config.json has vocab_size 10 but the tokenizer has"):
        consistency.check_vocab(source, 10, 2000)
    assert consistency.check_vocab(source, 2008, 2000)["masked_logits"] == 8


def test_special_tokens_are_checked_against_the_map_and_the_config(twins_dir, tmp_path):
    from jaonnx_export import consistency

    source = _source(twins_dir, tmp_path, "rinna-gpt-1b")
    recipe = source.recipe
    backend = load_backend(recipe.tokenizer_backend, source.directory / recipe.tokenizer_file)
    config = json.loads((source.directory / "config.json").read_text(encoding="utf-8"))
    ids, found = consistency.special_ids(source, recipe, backend, SimpleNamespace(**config))
    assert found["special_tokens_checked"] == ["eos", "unk"]
    assert ids["eos"] == config["eos_token_id"] and "special_ids_overridden" not in found
    assert consistency.describe_special(source, found) is None
    # the config's eos id disagrees with the tokenizer: the tokenizer's id is used and recorded
    ids, found = consistency.special_ids(source, recipe, backend, SimpleNamespace(**{**config, "eos_token_id": 7}))
    assert ids["eos"] == backend.piece_to_id("</s>") == config["eos_token_id"]
    assert found["special_ids_overridden"]["roles"] == {"eos": {"config": 7, "tokenizer": ids["eos"], "token": "</s>"}}
    line = consistency.describe_special(source, found)
    assert "eos_token_id 7 but the tokenizer's '</s>' is 3" in line and "\n" not in line
    # special_tokens_map.json names another eos token
    path = source.directory / "special_tokens_map.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), "eos_token": "<eos>"}), encoding="utf-8")
    with pytest.raises(JaonnxError, match="special_tokens_map.json names '<eos>' as the eos token"):
        consistency.special_ids(source, recipe, backend, SimpleNamespace(**config))


def test_config_ids_that_disagree_with_the_tokenizer_follow_the_card(twins_dir, tmp_path):
    """config.json (and generation_config.json) say eos is 2, the tokenizer's '</s>' is 3. The
    card passes pad/bos/eos from the tokenizer to generate, so transformers run its way stops
    on 3 and runs through 2; export warns in one line, records the choice, and the runtime
    generates exactly the card's ids."""
    import torch
    import transformers

    from jaonnx_export.export import ExportWarning, export

    twin = tmp_path / "gpt2-small-ja"
    shutil.copytree(twins_dir / "gpt2-small-ja", twin)
    tok = hf_tokenizer(twin)
    eos, config_eos = tok.eos_token_id, tok.bos_token_id
    assert (eos, config_eos) == (3, 2)
    model = transformers.GPT2LMHeadModel.from_pretrained(twin).eval()
    prompt = torch.tensor([tok.encode("近年の機械学習は", add_special_tokens=False)])

    def greedy(**ids: int | None) -> list[int]:
        with torch.no_grad():
            return model.generate(prompt, do_sample=False, max_new_tokens=40, **ids)[0, prompt.shape[1]:].tolist()

    # Make greedy decoding emit config's eos early and the tokenizer's eos later (tied head:
    # each id's logit follows that of the token whose embedding it copies).
    plain = greedy(eos_token_id=None, pad_token_id=tok.pad_token_id)
    early, late = plain[1], next(t for t in plain[8:] if t not in plain[:8])
    with torch.no_grad():
        model.transformer.wte.weight[config_eos] = 1.3 * model.transformer.wte.weight[early]
        model.transformer.wte.weight[eos] = 1.3 * model.transformer.wte.weight[late]
    model.config.eos_token_id = model.generation_config.eos_token_id = config_eos
    model.save_pretrained(twin)
    card = greedy(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert card[-1] == eos and config_eos in card[:-1] and len(card) < 40, card  # the setup bites

    with pytest.warns(ExportWarning) as caught:
        manifest = export(str(twin), tmp_path / "art")
    (warning,) = [str(w.message) for w in caught if w.category is ExportWarning]
    assert "eos_token_id 2 but the tokenizer's '</s>' is 3" in warning and "\n" not in warning
    recorded = jaonnx.read_manifest(tmp_path / "art")
    assert recorded.special_ids["eos"] == manifest.special_ids["eos"] == eos
    assert recorded.checks["special_ids_overridden"]["roles"]["eos"] == {"config": 2, "tokenizer": 3, "token": "</s>"}
    result = jaonnx.load(tmp_path / "art").generate("近年の機械学習は", max_new_tokens=40, do_sample=False,
                                                     return_ids=True)
    assert result.generated_ids == card
    assert result.finish_reason == "eos"


def test_only_the_tokens_the_task_uses_are_required(twins_dir, tmp_path):
    """rinna-gpt-1b's recipe lists [CLS]/[SEP]/[MASK]; generation never uses them."""
    import dataclasses

    from jaonnx_export import consistency

    source = _source(twins_dir, tmp_path, "rinna-gpt-1b")
    special = dataclasses.replace(source.recipe.special, cls="<no-such-cls>", mask="<no-such-mask>")
    recipe = dataclasses.replace(source.recipe, special=special)
    backend = load_backend(recipe.tokenizer_backend, source.directory / recipe.tokenizer_file)
    config = SimpleNamespace(**json.loads((source.directory / "config.json").read_text(encoding="utf-8")))
    ids, found = consistency.special_ids(source, recipe, backend, config)
    assert "mask" not in ids and set(found["special_tokens_absent"]) == {"cls", "mask"}
    broken = dataclasses.replace(recipe, special=dataclasses.replace(special, eos="<no-such-eos>"))
    (source.directory / "special_tokens_map.json").unlink()  # else it reports the mismatch with '</s>' first
    with pytest.raises(JaonnxError, match="has no '<no-such-eos>' \\(eos\\)"):
        consistency.special_ids(source, broken, backend, config)


def test_generation_config_is_reported_against_the_card(twins_dir, tmp_path):
    from jaonnx_export import consistency

    source = _source(twins_dir, tmp_path, "gpt2-small-ja")
    path = source.directory / "generation_config.json"
    path.write_text(json.dumps({"do_sample": False, "top_k": 50, "max_length": 20}), encoding="utf-8")
    report = consistency.generation_report(source, source.recipe)
    differs = report["generation_config"]["differs_from_recipe"]
    assert differs == {"do_sample": {"generation_config": False, "recipe": True},
                       "max_length": {"generation_config": 20, "recipe": None}}
    assert "do_sample=False (card True)" in consistency.describe_generation(report)


def test_padded_vocabulary_is_masked_at_run_time(twins_dir, tmp_path):
    """A config vocab larger than the tokenizer (a padded embedding table): export passes, the
    manifest records both sizes, and fill-mask never predicts an id the tokenizer lacks, even
    when the padded rows would win every softmax."""
    import torch
    import transformers

    from jaonnx_export.export import export

    twin = tmp_path / "padded"
    shutil.copytree(twins_dir / "ken11-albert", twin)
    model = transformers.AlbertForMaskedLM.from_pretrained(twin)
    size = model.config.vocab_size
    model.resize_token_embeddings(size + 8)
    with torch.no_grad():
        model.predictions.bias[size:] = 100.0
        model.predictions.decoder.bias = model.predictions.bias
    model.save_pretrained(twin)
    manifest = export(str(twin), tmp_path / "art")
    assert (manifest.vocab_size, manifest.tokenizer_size) == (size + 8, size)
    assert manifest.checks["masked_logits"] == 8
    fm = jaonnx.load(tmp_path / "art")
    predictions = fm("大学で[MASK]の研究をしています", top_k=5)
    assert all(p["token"] < size for p in predictions)
    assert np.isneginf(fm.logits([fm.encode("[MASK]です")["input_ids"]])[0, 0, size:]).all()


def test_export_code_does_not_import_the_twin_builder():
    code = ("import sys, jaonnx_export.export, jaonnx_export.precision, jaonnx_export.quality, "
            "jaonnx_export.corpus; print([m for m in sys.modules if m.startswith('jaonnx_export.twins')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
