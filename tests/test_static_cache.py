"""The static (in-place) KV-cache layout: `jaonnx export --kv-cache static` and
StaticBatchDecoder, checked against transformers run on each text alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import export_via_cli
from helpers import assert_one_line_error, batch_greedy, hf_greedy, hf_logits, hf_model, hf_tokenizer, jaonnx_cli

RECIPE = "gpt2-small-ja"
TEXTS = ["4年に1度オリンピックは開かれる。", "大学で", "近年の機械学習は急速に進歩しているが、その一方で"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def static_artifacts(twins_dir: Path, cache_dir: Path) -> dict[str, Path]:
    root = cache_dir / "static-kv"
    return {
        "fp32": export_via_cli(twins_dir / RECIPE, root / f"{RECIPE}-fp32", "--kv-cache", "static"),
        "int8": export_via_cli(twins_dir / RECIPE, root / f"{RECIPE}-int8", "--kv-cache", "static", "--quantize", "int8"),
    }


@pytest.fixture(scope="module")
def model(twins_dir: Path):
    return hf_model(twins_dir / RECIPE)


@pytest.fixture(scope="module")
def prompts(twins_dir: Path) -> list[list[int]]:
    tokenizer = hf_tokenizer(twins_dir / RECIPE)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _decoder(artifact: Path):
    from jaonnx.artifact import read_manifest
    from jaonnx.generation.static_cache import StaticBatchDecoder
    from jaonnx.session import create_session

    manifest = read_manifest(artifact)
    return StaticBatchDecoder(create_session(artifact / manifest.model_file, providers="cpu"), manifest)


def test_export_writes_static_layout_and_one_embedding_table(static_artifacts: dict, model) -> None:
    import onnx

    from jaonnx.artifact import read_manifest

    manifest = read_manifest(static_artifacts["fp32"])
    assert manifest.decoder.kv_layout == "static"
    assert manifest.parity["top1_agreement"] == 1.0
    assert manifest.parity["max_abs_logit_diff"] <= manifest.parity["tolerance"]
    graph = onnx.load(str(static_artifacts["fp32"] / "model.onnx")).graph
    table = list(model.transformer.wte.weight.shape)
    shapes = [list(t.dims) for t in graph.initializer]
    # the tied LM head reads the embedding table itself (stored once, as [hidden, vocab])
    assert shapes.count(table) + shapes.count(table[::-1]) == 1
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == model.config.n_layer


def test_solo_greedy_and_step_logits_match_transformers(static_artifacts: dict, model, prompts: list) -> None:
    for ids in prompts:
        decoder = _decoder(static_artifacts["fp32"])
        logits = decoder.add([ids], reserve=len(ids) + NEW_TOKENS)[0]
        sequence, got = list(ids), []
        for _ in range(NEW_TOKENS):
            np.testing.assert_allclose(logits, hf_logits(model, sequence)[-1], atol=1e-3)
            token = int(logits.argmax())
            got.append(token)
            sequence.append(token)
            logits = decoder.step(np.array([[token]]))[0, -1]
        assert got == hf_greedy(model, ids, NEW_TOKENS)


def test_mixed_length_batch_equals_transformers_alone(static_artifacts: dict, model, prompts: list) -> None:
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths
    got = batch_greedy(_decoder(static_artifacts["fp32"]), prompts, NEW_TOKENS)
    assert got == [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]


def test_join_keep_discard_and_block_equal_solo_runs(static_artifacts: dict, model, prompts: list) -> None:
    """Rows join a running batch, a 3-token block is verified and 2 of it discarded, a row
    leaves and the rest are renumbered: every logit equals transformers on that row alone."""
    decoder = _decoder(static_artifacts["fp32"])
    sequences = [list(p) for p in prompts[:2]]
    logits = decoder.add(prompts[:2], reserve=8)  # a small reserve: capacity grows later

    def check(rows_logits: np.ndarray) -> None:
        for row, seq in enumerate(sequences):
            np.testing.assert_allclose(rows_logits[row], hf_logits(model, seq)[-1], atol=1e-3)

    check(logits)
    for round_ in range(3):
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens):
            sequences[row].append(int(token))
        logits = decoder.step(tokens[:, None])[:, -1]
        check(logits)
        if round_ == 0:
            joined = decoder.add([prompts[2]], reserve=20)
            sequences.append(list(prompts[2]))
            np.testing.assert_allclose(joined[0], hf_logits(model, prompts[2])[-1], atol=1e-3)
            logits = np.concatenate([logits, joined])
    block = np.array([[int(logits[r].argmax()), 7, 11] for r in range(decoder.rows)])
    verified = decoder.step(block)
    for row, seq in enumerate(sequences):
        np.testing.assert_allclose(verified[row], hf_logits(model, seq + block[row].tolist())[-3:], atol=1e-3)
        seq.append(int(block[row, 0]))
    decoder.discard(2)
    decoder.keep([2, 0])
    sequences = [sequences[2], sequences[0]]
    logits = verified[[2, 0], 0]
    for _ in range(60):  # past the first allocation (64 positions)
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens):
            sequences[row].append(int(token))
        logits = decoder.step(tokens[:, None])[:, -1]
    assert decoder.capacity > 64
    check(logits)
    scored = decoder.logits(prompts[1])
    np.testing.assert_allclose(scored, hf_logits(model, prompts[1]), atol=1e-3)
    assert decoder.rows == 2  # scoring left the batch alone


def test_logits_stay_valid_while_decode_steps_and_prefill_chunks_alternate(static_artifacts: dict, model,
                                                                         prompts: list) -> None:
    """A running row decodes while another prompt is prefilled in chunks of 2 (the two
    bindings are reused in turn, inputs and logits bound by address). Every logits array
    returned is kept to the end and still equals transformers: none is a buffer a later run
    writes over."""
    decoder = _decoder(static_artifacts["fp32"])
    sequence = list(prompts[0])
    kept = [(list(sequence), decoder.add([prompts[0]], reserve=40)[0])]
    joining = prompts[2]
    row = decoder.open(reserve=len(joining) + 4)
    chunk_logits = []
    for start in range(0, len(joining), 2):
        token = int(kept[-1][1].argmax())
        sequence.append(token)
        kept.append((list(sequence), decoder.step(np.array([[token]]))[0, -1]))
        chunk_logits.append((joining[: start + 2], decoder.fill(row, joining[start : start + 2])))
    assert len(kept) > 3 and len(joining) % 2 == 1  # an odd prompt: the last chunk has another shape
    for ids, logits in kept + chunk_logits:
        np.testing.assert_allclose(logits, hf_logits(model, ids)[-1], atol=1e-3)


def test_kept_bindings_do_not_pin_wide_logits(static_artifacts: dict, model, prompts: list) -> None:
    """A chunk scored at every position (prompt log-probabilities) returns its full logits, but
    the binding kept for reuse holds no buffer that size; decode steps' small ones are kept."""
    from jaonnx.generation.static_cache import HELD_LOGITS_BYTES

    decoder = _decoder(static_artifacts["fp32"])
    vocab = model.config.vocab_size
    wide = HELD_LOGITS_BYTES // (vocab * 4) + 8  # positions whose logits exceed the limit
    logits = decoder.add([prompts[0]], reserve=wide + 40)
    decoder.step(logits.argmax(-1)[:, None])
    kept = decoder.held_logits_bytes
    assert 0 < kept <= HELD_LOGITS_BYTES
    sequence = (prompts[1] * (wide // len(prompts[1]) + 1))[:wide]
    row = decoder.open(reserve=wide + 4)
    every = decoder.fill(row, sequence, every=True)
    assert every.shape[0] == wide
    np.testing.assert_allclose(every[-1], hf_logits(model, sequence)[-1], atol=1e-3)
    assert decoder.held_logits_bytes <= HELD_LOGITS_BYTES < every.nbytes


def test_int8_static_graph_quantizes_every_matmul_and_head(static_artifacts: dict, model, prompts: list) -> None:
    import onnx

    from jaonnx.artifact import read_manifest

    manifest = read_manifest(static_artifacts["int8"])
    assert manifest.decoder.kv_layout == "static"
    assert manifest.quality["passed"] and manifest.quality["top1_agreement"] >= 0.95
    graph = onnx.load(str(static_artifacts["int8"] / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4 * model.config.n_layer + 1  # the tied head too (per-row int8)
    assert "MatMul" not in ops and "Gemm" not in ops
    got = batch_greedy(_decoder(static_artifacts["int8"]), prompts, 4)
    assert [len(r) for r in got] == [4, 4, 4]


def test_static_decoder_errors(static_artifacts: dict) -> None:
    from jaonnx.artifact import read_manifest
    from jaonnx.errors import JaonnxError
    from jaonnx.generation.static_cache import StaticBatchDecoder

    decoder = _decoder(static_artifacts["fp32"])
    with pytest.raises(JaonnxError, match="at least one prompt"):
        decoder.add([], reserve=4)
    with pytest.raises(JaonnxError, match="rows=0"):
        decoder.step(np.array([[1]]))
    decoder.add([[5, 6, 7]], reserve=4)
    with pytest.raises(JaonnxError, match="at least one token"):
        decoder.discard(3)
    with pytest.raises(JaonnxError, match="distinct row numbers"):
        decoder.keep([1])
    decoder.add([[5]], reserve=10**6)  # a reserve is a hint: capped at the model's positions
    assert decoder.capacity == decoder.max_positions
    with pytest.raises(JaonnxError, match="exceed the model"):
        decoder.add([[5] * (decoder.max_positions + 1)], reserve=4)
    concat = read_manifest(static_artifacts["fp32"])
    concat.decoder.kv_layout = "concat"
    with pytest.raises(JaonnxError, match="--kv-cache static"):
        StaticBatchDecoder(decoder.session, concat)


@pytest.mark.parametrize(
    ("recipe", "value", "needle"),
    [
        (RECIPE, "paged", "--kv-cache must be static or concat"),
        ("rinna-roberta", "static", "--kv-cache applies to text-generation"),
        ("rinna-gpt-1b", "static", "not a multiple of 8"),  # the twin's head_dim is 4
    ],
)
def test_kv_cache_option_errors(twins_dir: Path, tmp_path: Path, recipe: str, value: str, needle: str) -> None:
    proc = jaonnx_cli("export", str(twins_dir / recipe), "-o", str(tmp_path / "out"), "--kv-cache", value)
    if recipe == "rinna-gpt-1b":  # found after loading the model, below the export's progress lines
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, proc.stderr
        return
    assert_one_line_error(proc, needle)


def test_artifacts_without_kv_layout_load_as_concat() -> None:
    from jaonnx.artifact import Manifest

    old = {"recipe": RECIPE, "task": "text-generation", "model_file": "model.onnx", "tokenizer_file": "spiece.model",
           "special_ids": {}, "vocab_size": 10, "max_positions": 8, "inputs": {}, "outputs": {},
           "decoder": {"num_layers": 1, "num_heads": 2, "head_dim": 8}}
    assert Manifest.from_dict(old).decoder.kv_layout == "concat"
