"""Regions (header, blk.N, globals): every fragment in exactly one, and exactly the fragments a span
needs, whatever the fragment size; what a peer with some fragments announces."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import UserError
from distribution.local import LocalLoader
from distribution.spans import complete_regions, fragment_regions, parse_spans, regions_of_fragments, span_tensors
from fragmenter.fragment import fragment_file
from models.factory import ModelSpec, write_model


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spans")
    return write_model(replace(ModelSpec(), n_layers=3), tmp / "three.gguf"), tmp


def check_regions(manifest):
    regions = fragment_regions(manifest)
    n = 1 + max(t.layer for t in manifest.tensors if t.layer is not None)
    assert set(regions) == {"header", "globals"} | {f"blk.{i}" for i in range(n)}
    by_fragment = regions_of_fragments(manifest)
    assert set(by_fragment) == set(manifest.unique_fragments())  # every fragment has a region...
    assert all(len(r) == 1 for r in by_fragment.values())        # ...and (no repeated bytes here) one
    for i in range(n):  # a block's region is exactly the fragments of its tensors
        names = [t.name for t in manifest.layer_tensors(i, i)]
        assert set(regions[f"blk.{i}"]) == set(manifest.fragments_for(names))
    assert set(regions["header"]) == {p.fragment for p in manifest.header_pieces}
    globals_ = [t.name for t in manifest.tensors if t.layer is None]
    assert set(regions["globals"]) == set(manifest.fragments_for(globals_))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=256, max_value=40000))
def test_regions_partition_the_fragments_at_any_fragment_size(gguf, size):
    path, tmp = gguf
    out = tmp / f"store{size}"
    if not out.exists():
        fragment_file(str(path), out, size, progress=False)
    check_regions(LocalLoader(out).manifest)


def test_a_span_peer_announces_its_complete_regions_and_loose_fragments(gguf):
    path, tmp = gguf
    fragment_file(str(path), tmp / "s", 4096, progress=False)
    m = LocalLoader(tmp / "s").manifest
    held = set(m.fragments_for(span_tensors(m, [(0, 1)]), header=True))
    full, loose = complete_regions(m, held)
    assert sorted(full) == ["blk.0", "blk.1", "header"]
    # block 0 brings the embedding but not the output norm and head: globals is announced per fragment
    assert loose and set(loose) == set(m.fragments_for(["token_embd.weight"])) - set(fragment_regions(m)["blk.0"])
    everything = set(m.unique_fragments())
    assert complete_regions(m, everything) == (list(fragment_regions(m)), [])


def test_parse_spans():
    assert parse_spans("0-9,20-29") == [(0, 9), (20, 29)]
    for bad in ("five", "3-1", "-1-2", "1-"):
        with pytest.raises(UserError):
            parse_spans(bad)
