"""Factory models are deterministic and real: llama.cpp loads and runs every one of them."""

import hashlib
import subprocess
import sys
from dataclasses import replace

from models.factory import ModelSpec, standard_specs, write_model

RUN_IN_LLAMA_CPP = r"""
import sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=128, n_threads=2, verbose=False, seed=0)
toks = m.tokenize(b"The quick brown fox, 1234!", add_bos=True)
out = m.create_completion("Hello world", max_tokens=6, temperature=0.0)
print(len(toks), out["usage"]["completion_tokens"])
"""


def test_standard_specs_cover_the_matrix():
    specs = standard_specs().values()
    assert {s.weight_type for s in specs} >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}
    assert {s.vocab for s in specs} == {"spm", "bpe"}
    kinds = {("mha" if s.n_kv_heads == s.n_heads else "mqa" if s.n_kv_heads == 1 else "gqa") for s in specs}
    assert kinds == {"mha", "gqa", "mqa"}
    assert {s.tied_output for s in specs} == {True, False}
    for s in specs:
        assert s.dim % 32 == 0 and s.dim % 256 and s.ffn_dim % 32 == 0 and s.ffn_dim % 256


def test_every_factory_model_runs_in_llama_cpp(factory_models):
    for name, path in factory_models.items():
        # A separate process each: a crash inside llama.cpp must fail this test, not kill pytest.
        proc = subprocess.run([sys.executable, "-c", RUN_IN_LLAMA_CPP, str(path)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        n_prompt, n_generated = map(int, proc.stdout.split())
        assert n_prompt > 3 and n_generated >= 1, name


def test_same_spec_same_bytes(tmp_path):
    spec = replace(ModelSpec(), vocab="bpe", weight_type="Q4_1", seed=7)
    a = write_model(spec, tmp_path / "a.gguf").read_bytes()
    b = write_model(spec, tmp_path / "b.gguf").read_bytes()
    c = write_model(replace(spec, seed=8), tmp_path / "c.gguf").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert a != c
