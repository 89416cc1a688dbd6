"""What `api` shows while a remote model loads: the stages, and the bytes of fragments fetched."""

from __future__ import annotations

from cli.api import model_loader
from common.progress import byte_progress, watch_progress
from fragmenter.fragment import fragment_file
from tests.distribution.netutil import serving


def test_watchers_hear_byte_progress_even_when_silent():
    heard = []
    stop = watch_progress(lambda desc, done, total: heard.append((desc, done, total)))
    try:
        with byte_progress(300, "fetch 2 fragments", enabled=False) as bar:
            bar.update(100)
            bar.update(200)
    finally:
        stop()
    assert heard == [("fetch 2 fragments", 0, 300), ("fetch 2 fragments", 100, 300), ("fetch 2 fragments", 300, 300)]
    with byte_progress(10, "after", enabled=False) as bar:
        bar.update(10)
    assert len(heard) == 3  # stopped watching


def test_loading_over_http_reports_stages_and_fetched_bytes(factory_models, tmp_path, monkeypatch):
    monkeypatch.setenv("GGUF_FRAGMENTS_CACHE", str(tmp_path / "cache"))  # nothing cached: every fragment is fetched
    store = tmp_path / "store"
    fragment_file(str(factory_models["q8_0-spm-gqa"]), store, 8192, progress=False)
    reports, said = [], []
    with serving(store, "--port", "0") as server:
        load = model_loader(server.url, "numpy", None, said.append)
        model = load(lambda *report: reports.append(report))
    assert model.name == "factory-llama"
    assert said[0].startswith("loading factory-llama from http://127.0.0.1:") and said[-1].startswith("ready")
    bulk = [r for r in reports if r[0] == reports[-2][0]]  # the weights' fetch, just before "ready"
    assert bulk[0][0].startswith("fetch ") and bulk[0][3] == "B"
    assert bulk[0][1] == 0 and bulk[-1][1] == bulk[-1][2] > 0  # from nothing to every byte
    assert [r[1] for r in bulk] == sorted(r[1] for r in bulk) and len(bulk) > 3  # and in steps
