"""validate holds the engine against llama.cpp, and a wrong engine fails it."""

import json
import struct

import numpy as np
import pytest
from gguf import GGUFReader, quants

from common.errors import UserError
from distribution.gguf_file import GGUFFileLoader
from engine.model import LlamaModel
from engine.tokenizer import Tokenizer
from tests.conftest import assert_one_line_error, run_cli
from validation.compare import DEFAULT_PROMPTS, logit_metrics, validate
from validation.reference import load_llama
from validation.twin import write_f32_twin

KEYS = {"top1_agreement", "mean_kl", "min_cosine", "nmse", "greedy_match", "pass", "reference", "activations"}


def test_metrics_on_known_values():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    m = logit_metrics(a, a)
    assert m["top1_agreement"] == 1.0 and m["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert m["min_cosine"] == pytest.approx(1.0) and m["nmse"] == 0.0
    b = a.copy()
    b[1] = [5.0, 0.0, 0.0]
    m = logit_metrics(a, b)
    assert m["top1_agreement"] == 0.5 and m["mean_kl"] > 1


@pytest.mark.parametrize("name, reference", [("f32-spm-gqa", "direct"), ("bf16-spm-gqa", "direct"),
                                             ("q8_0-spm-gqa", "f32-twin"), ("f16-bpe-mqa", "direct")])
def test_factory_models_pass(factory_models, name, reference):
    path = factory_models[name]
    proc = run_cli("validate", path, "--gguf", path, "--json", "--greedy-tokens", "32")
    report = json.loads(proc.stdout)
    assert KEYS <= set(report)
    assert report["reference"] == reference
    assert proc.returncode == 0 and report["pass"], report
    assert report["positions"] >= 512 and len(report["greedy"]) == 5


def test_default_model_passes(default_store, default_gguf):
    proc = run_cli("validate", default_store, "--gguf", default_gguf, "--json", timeout=900)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["pass"], {k: report[k] for k in KEYS | {"direct", "llama_cpp_self"}}
    assert report["reference"] == "f32-twin" and report["mean_kl"] <= 1e-3 and report["greedy_match"]
    assert report["direct_ok"]


class WrongOrientation(GGUFFileLoader):
    """The seed's bug: reading the [out, in] bytes as if they were [in, out]."""

    def load_tensor(self, name):
        values = super().load_tensor(name)
        if values.ndim == 2 and name != "token_embd.weight":
            return np.ascontiguousarray(values.reshape(values.shape[::-1]).T)
        return values


def test_wrong_weight_orientation_fails(factory_models):
    path = factory_models["f32-spm-gqa"]
    loader = WrongOrientation(path)
    model = LlamaModel(loader)
    llm = load_llama(path, n_ctx=512, logits_all=True)
    report = validate(model, Tokenizer(loader.metadata), llm, DEFAULT_PROMPTS[:2], 512, 8)
    assert not report.passed
    assert report.metrics["mean_kl"] > 1e-2 and report.metrics["min_cosine"] < 0.99


def test_twin_keeps_metadata_and_weight_values(factory_models, tmp_path):
    src = factory_models["q4_1-spm-gqa"]
    twin = write_f32_twin(src, tmp_path / "twin.gguf")
    a, b = GGUFReader(src), GGUFReader(twin)
    assert {t.name for t in b.tensors} == {t.name for t in a.tensors}
    assert all(t.tensor_type.name == "F32" for t in b.tensors)
    for ta in a.tensors:
        tb = next(t for t in b.tensors if t.name == ta.name)
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(-1), quants.dequantize(ta.data, ta.tensor_type).reshape(-1))
    assert b.fields["tokenizer.ggml.tokens"].contents() == a.fields["tokenizer.ggml.tokens"].contents()
    assert b.fields["general.file_type"].contents() == 0


@pytest.mark.parametrize("speed", [[], ["--speed", "--tokens", "2", "--prompt-tokens", "8", "--rounds", "1"]])
@pytest.mark.parametrize("other", ["q4_0-spm-mha-tied", "q4_0-spm-gqa"])
def test_validate_refuses_a_different_model(factory_models, other, speed):
    """Another model, or another quantization of the same one; --speed checked neither (llama.cpp
    then failed with a RuntimeError traceback, or the speeds of two different files were compared)."""
    proc = run_cli("validate", factory_models["q8_0-spm-gqa"], "--gguf", factory_models[other], *speed)
    assert_one_line_error(proc, "holds different tensors than", "give the store's source file")


def test_a_file_llama_cpp_refuses_is_one_line(factory_models, tmp_path):
    """Our parser takes it (the engine refuses it later, naming the block); llama.cpp's loader says
    only "Failed to load", which was a ValueError traceback."""
    data = bytearray(factory_models["q8_0-spm-gqa"].read_bytes())
    key = b"llama.block_count"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # UINT32
    struct.pack_into("<I", data, at + 4, struct.unpack_from("<I", data, at + 4)[0] - 1)
    path = tmp_path / "fewer-blocks.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="fewer-blocks.gguf: llama.cpp cannot load it"):
        load_llama(path)


def test_positions_asked_are_positions_compared_and_stages_are_shown(factory_models):
    """--positions 16 compares 16 positions (it used to report 256), and a terminal sees each stage."""
    import pexpect

    from tests.conftest import BIN

    path = str(factory_models["q8_0-spm-gqa"])
    args = [path, "--gguf", path, "--positions", "16", "--greedy-tokens", "4", "--prompt", "hello"]
    child = pexpect.spawn(str(BIN / "validate"), args, encoding="utf-8", timeout=600)
    child.expect(pexpect.EOF)
    out = child.before
    for stage in ("writing the F32 twin", "loading the engine", "engine logits over 16 positions in 1 sequence",
                  "greedy 1/1", "direct comparison", "llama.cpp's own noise", "] done"):
        assert stage in out, (stage, out)
    assert "positions       16" in out
    proc = run_cli("validate", *args, "--json")
    assert json.loads(proc.stdout)["positions"] == 16 and proc.stderr == ""


def test_help_describes_every_option():
    out = run_cli("validate", "--help").stdout
    assert "Tokens each engine generates greedily" in out and "CPU threads for both engines" in out
