"""The session seam: a local model and a route of spans give the same logits; rewind; close."""

import numpy as np
import pytest

from distribution.gguf_file import GGUFFileLoader
from engine.model import LlamaModel
from engine.session import LocalSpanSession, RoutedSession, Session, SpanSession

TOKENS = [1, 17, 99, 23, 250, 7, 311, 42, 5, 128, 64, 300]


@pytest.fixture(scope="module")
def loader(factory_models):
    return GGUFFileLoader(factory_models["q8_0-spm-gqa"])


def test_session_equals_forward_and_rewinds(loader):
    model = LlamaModel(loader)
    expected = model.forward(np.array(TOKENS), model.new_cache(32), all_logits=True)
    with model.open_session(32) as s:
        assert isinstance(s, Session)
        np.testing.assert_allclose(s.feed(TOKENS[:5], all_logits=True), expected[:5], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.feed(TOKENS[5:]), expected[-1], rtol=1e-4, atol=1e-4)
        assert s.position == len(TOKENS)
        s.rewind(3)
        assert s.position == 3
        np.testing.assert_allclose(s.feed(TOKENS[3:]), expected[-1], rtol=1e-4, atol=1e-4)


def test_route_of_spans_equals_whole_model(loader):
    whole = LlamaModel(loader)
    expected = whole.open_session(32).feed(TOKENS)
    n = whole.config.n_layers
    edges = LlamaModel(loader, edges_only=True)
    assert edges.blocks == [] and edges.has_embedding and edges.has_head
    spans = [LocalSpanSession(LlamaModel(loader, layers=(0, 0)), 32),
             LocalSpanSession(LlamaModel(loader, layers=(1, n - 1)), 32)]
    assert all(isinstance(s, SpanSession) for s in spans)
    session = RoutedSession(edges, spans)
    np.testing.assert_allclose(session.feed(TOKENS), expected, rtol=1e-4, atol=1e-4)


def test_route_must_cover_every_block(loader):
    edges = LlamaModel(loader, edges_only=True)
    with pytest.raises(ValueError, match="block 0"):
        RoutedSession(edges, [LocalSpanSession(LlamaModel(loader, layers=(1, 1)), 8)])
    with pytest.raises(ValueError, match="ends at block 0"):
        RoutedSession(edges, [LocalSpanSession(LlamaModel(loader, layers=(0, 0)), 8)])


def test_context_full_is_a_clear_error(loader):
    from common.errors import UserError

    s = LlamaModel(loader).open_session(4)
    with pytest.raises(UserError, match="context full"):
        s.feed(TOKENS[:5])
    s.close()


def test_forward_layers_steps_yields_between_blocks_and_computes_the_same(loader):
    """The generator form a node steps on its event loop: a pause after every block of a multi-row
    pass (none for a one-row decode step), and bit for bit what forward_layers computes."""
    model = LlamaModel(loader, backend="numba")
    x = np.random.default_rng(3).standard_normal((7, model.config.dim)).astype(np.float32)
    one_call, stepped = model.new_cache(16), model.new_cache(16)
    expected = model.forward_layers(x, one_call, 0)
    steps = model.forward_layers_steps(x, stepped, 0)
    pauses = 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            got = done.value
            break
    assert pauses == len(model.blocks) - 1
    np.testing.assert_array_equal(got, expected)
    assert stepped.length == one_call.length == 7
    decode = model.forward_layers_steps(x[:1], stepped, 7)
    with pytest.raises(StopIteration) as done:
        next(decode)  # a decode step is one piece: no pause
    np.testing.assert_array_equal(done.value.value, model.forward_layers(x[:1], one_call, 7))


def test_rope_table_holds_what_a_call_for_each_position_gives(loader):
    from engine import ops

    model = LlamaModel(loader, backend="numba")
    cfg = model.config
    sizes = []
    for first, T in ((0, 1), (3, 7), (250, 20), (300, 1), (5, 500)):  # the table grows once
        cos, sin = model._rope(first, T)
        sizes.append(len(model._rope_table[0]))
        want = ops.rope_angles(np.arange(first, first + T), cfg.rope_dim, cfg.rope_base, cfg.rope_scale,
                               model.rope_freq_factors)
        np.testing.assert_array_equal(cos, want[0])
        np.testing.assert_array_equal(sin, want[1])
    assert sizes == [256, 256, 512, 512, 512] and cfg.context_length == 512


def test_a_remote_route_hands_only_the_head_to_the_compute_thread(loader, monkeypatch):
    """With remote spans, the caller's thread waits on the network; the embedding (a NumPy row
    lookup) runs there too, and only the head (parallel kernels) goes to the compute thread: one
    hand-over per token, as a local session's whole step takes."""
    from common import compute

    class Remote(LocalSpanSession):
        local = False

    whole = LlamaModel(loader)
    expected = whole.open_session(32).feed(TOKENS)
    handed = []
    monkeypatch.setattr(compute, "run", lambda fn, *a, **k: (handed.append(fn), fn(*a, **k))[1])
    session = RoutedSession(LlamaModel(loader, edges_only=True),
                            [Remote(LlamaModel(loader, layers=(0, whole.config.n_layers - 1)), 32)])
    handed.clear()  # (loading went through it too)
    np.testing.assert_allclose(session.feed(TOKENS), expected, rtol=1e-4, atol=1e-4)
    names = [getattr(fn, "__name__", "?") for fn in handed]
    assert "embed" not in names and names.count("head") == 1, names  # (the stand-in span's own pass hops too)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_forward_token_is_forward_layers_for_one_position(loader, backend):
    """The decode step a relaying node takes without forward_layers' generators: bit for bit the
    same rows and cache, the one-call decoder where the backend has one; past the cache, the same
    clear error."""
    from common.errors import UserError

    model = LlamaModel(loader, backend=backend)
    assert (model.decoder is not None) == (backend == "numba")  # (both of forward_token's ways)
    x = np.random.default_rng(4).standard_normal((6, model.config.dim)).astype(np.float32)
    a, b = model.new_cache(6), model.new_cache(6)
    model.forward_layers(x[:5], a, 0)
    model.forward_layers(x[:5], b, 0)
    np.testing.assert_array_equal(model.forward_token(x[5:], a, 5), model.forward_layers(x[5:], b, 5))
    assert a.length == b.length == 6
    np.testing.assert_array_equal(a.k[:, :6], b.k[:, :6])
    with pytest.raises(UserError, match="context full"):
        model.forward_token(x[5:], a, 6)
