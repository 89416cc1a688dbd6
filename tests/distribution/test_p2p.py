"""P2P: peers announce fragments through a real Kademlia DHT (py-libp2p) on 127.0.0.1; a client
that knows one peer and the manifest's hash fetches everything, verified, with failover."""

import json
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from distribution import p2p_loader
from distribution.base import FragmentError
from distribution.local import LocalLoader
from distribution.addresses import parse_address
from distribution.p2p_loader import P2PLoader
from fragmenter.fragment import fragment_file
from models.factory import ModelSpec, write_model
from tests.conftest import assert_one_line_error, run_cli
from tests.distribution.netutil import serving

PEER_WAIT = "p2p://"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2pstore")
    path = write_model(replace(ModelSpec(), n_layers=4), tmp / "four.gguf")
    fragment_file(str(path), tmp / "store", 8192, progress=False)
    return tmp / "store"


def peer(store, *args, bootstrap=None):
    extra = ["--bootstrap", bootstrap] if bootstrap else []
    return serving(store, "--p2p", "--port", "0", *extra, *args, wait_for=PEER_WAIT)


def boot_of(server) -> str:
    return server.line("p2p://").split("@", 1)[1]


def peer_id(server) -> str:
    return boot_of(server).rsplit("/p2p/", 1)[1]


def copy_store(store, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(store, dst)
    return dst


def test_three_overlapping_peers_one_killed_mid_fetch(store, tmp_path, monkeypatch):
    warnings = []
    local = LocalLoader(store)
    with peer(store, "--layers", "0-2") as a, \
            peer(store, "--layers", "1-3", bootstrap=boot_of(a)) as b, \
            peer(store, "--layers", "0-0,3-3", bootstrap=boot_of(a)) as c:
        loader = P2PLoader(a.line("p2p://"), cache_dir=tmp_path / "cache", concurrency=2, warn=warnings.append)
        try:
            original = loader.fetcher.fetch_one
            fetched = []

            async def fetch_then_kill(session, url, fid, size, bar=None):
                await original(session, url, fid, size, bar)
                fetched.append(fid)
                if len(fetched) == 2:
                    b.kill()  # mid-fetch: the rest must come from a and c

            monkeypatch.setattr(loader.fetcher, "fetch_one", fetch_then_kill)
            loader.prefetch(loader.manifest.unique_fragments())
            assert b.proc.poll() is not None
            for name in local.manifest.tensor_names():
                np.testing.assert_array_equal(loader.load_tensor(name), local.load_tensor(name))
        finally:
            loader.close()
    # every fragment arrived exactly once; more than two were still to come when b died
    assert sorted(fetched) == sorted(local.manifest.unique_fragments()) and len(fetched) > 2
    assert sum(peer_id(b) in w for w in warnings) <= 1, warnings  # a dead peer is told once, not per fragment


def test_corrupt_peer_is_named_and_bytes_come_from_elsewhere(store, tmp_path, monkeypatch):
    """A peer that sends wrong bytes. `serve` hashes each fragment file before it first serves it
    (a fragment damaged on disk is a 404), so this one's file goes bad after that check: the same
    size and modification time, other bytes (bit rot; or a peer that lies)."""
    import urllib.request

    bad_store = copy_store(store, tmp_path, "bad")
    victim = LocalLoader(store).manifest.tensor("blk.2.ffn_down.weight").pieces[0].fragment
    path = bad_store / "fragments" / victim
    warnings = []
    with peer(bad_store) as bad, peer(store, bootstrap=boot_of(bad)) as good:
        with urllib.request.urlopen(f"{bad.url.rstrip('/')}/fragments/{victim}", timeout=30) as r:
            assert r.status == 200  # checked, and remembered as good
        st = os.stat(path)
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        # Ask the corrupting peer first, every time.
        monkeypatch.setattr(p2p_loader.random, "shuffle", lambda urls: urls.sort(key=lambda u: not u.startswith(bad.url)))
        # The client enters through the bad peer, which lists itself and the good one as providers.
        loader = P2PLoader(bad.line("p2p://"), cache_dir=tmp_path / "cache", warn=warnings.append)
        try:
            got = loader.load_tensor("blk.2.ffn_down.weight")
        finally:
            loader.close()
    np.testing.assert_array_equal(got, LocalLoader(store).load_tensor("blk.2.ffn_down.weight"))
    assert any(peer_id(bad) in w and "SHA-256" in w for w in warnings), warnings


def test_fragment_no_peer_has(store, tmp_path):
    holes = [copy_store(store, tmp_path, n) for n in ("x", "y")]
    victim = LocalLoader(store).manifest.tensor("blk.3.attn_k.weight").pieces[0].fragment
    for h in holes:
        (h / "fragments" / victim).unlink()
    with peer(holes[0]) as x, peer(holes[1], bootstrap=boot_of(x)):
        loader = P2PLoader(x.line("p2p://"), cache_dir=tmp_path / "cache", attempts=2, warn=lambda w: None)
        started = time.monotonic()
        try:
            with pytest.raises(FragmentError, match="blk.3.attn_k.weight") as info:
                loader.load_tensor("blk.3.attn_k.weight")
        finally:
            loader.close()
        assert "no peer provides it" in str(info.value) and time.monotonic() - started < 60


def test_wrong_manifest_hash_and_bad_addresses(store, tmp_path):
    with peer(store) as a:
        wrong = "p2p://" + "cd" * 32 + "@" + boot_of(a)
        proc = run_cli("infer", wrong, "--prompt", "hi", timeout=120,
                       env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "cache")})
        assert_one_line_error(proc, "no peer provides the manifest")
    for bad in ("p2p://nothex@/ip4/127.0.0.1/tcp/1/p2p/x", "p2p://" + "ab" * 32 + "@127.0.0.1:4001"):
        assert_one_line_error(run_cli("infer", bad, "--prompt", "hi"), "p2p")
    with pytest.raises(Exception):
        parse_address("p2p://" + "ab" * 32)


def test_infer_p2p_matches_local_also_after_a_peer_dies(default_store, tmp_path):
    args = ["--prompt", "What is the capital of France?", "--max-tokens", "16", "--json"]
    local = json.loads(run_cli("infer", default_store, *args).stdout)["text"]
    with peer(default_store) as full, \
            peer(default_store, "--layers", "0-14", bootstrap=boot_of(full)) as front, \
            peer(default_store, "--layers", "15-29", bootstrap=boot_of(full)) as back:
        proc = run_cli("infer", full.line("p2p://"), *args, timeout=300, env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c1")})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["text"] == local
        full.kill()  # its records linger in the DHT; the client must fail over to front and back
        proc = run_cli("infer", front.line("p2p://"), *args, timeout=300,
                       env={"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c2")})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["text"] == local
        assert back.proc.poll() is None


def test_a_peer_re_provides_what_it_fetched(store, tmp_path):
    cache = {"GGUF_FRAGMENTS_CACHE": str(tmp_path / "c0")}
    local = LocalLoader(store)
    span = [t.name for t in local.manifest.layer_tensors(2, 3)]
    with peer(store) as origin:
        proc = run_cli("fetch", origin.line("p2p://"), "-o", tmp_path / "copy", "--layers", "2-3", timeout=120, env=cache)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "copy" / "manifest.json").read_bytes() == (store / "manifest.json").read_bytes()
        with peer(tmp_path / "copy", bootstrap=boot_of(origin)) as relay:
            origin.kill()
            loader = P2PLoader(relay.line("p2p://"), cache_dir=tmp_path / "c1", attempts=2, warn=lambda w: None)
            try:
                for name in span:
                    np.testing.assert_array_equal(loader.load_tensor(name), local.load_tensor(name))
            finally:
                loader.close()


def test_providers_are_looked_up_per_block_not_per_fragment(store, tmp_path, monkeypatch):
    from distribution.dht import block_key, dht_key
    from distribution.spans import fragment_regions

    manifest = LocalLoader(store).manifest
    with peer(store) as full, peer(store, "--layers", "0-1", bootstrap=boot_of(full)):
        loader = P2PLoader(full.line("p2p://"), cache_dir=tmp_path / "cache")
        asked = []
        original = loader.node.find_keys
        monkeypatch.setattr(loader.node, "find_keys", lambda keys, thorough=False: asked.extend(keys) or
                            original(keys, thorough))
        try:
            loader.prefetch(manifest.unique_fragments())
        finally:
            loader.close()
    regions = fragment_regions(manifest)
    assert sorted(asked) == sorted(block_key(loader.manifest_sha256, r) for r in regions)
    assert not set(asked) & {dht_key(f) for f in manifest.unique_fragments()}
    assert len(asked) < len(manifest.unique_fragments())


def test_a_peer_with_part_of_a_block_is_found_when_the_block_holders_are_gone(store, tmp_path):
    from distribution.spans import fragment_regions

    block = fragment_regions(LocalLoader(store).manifest)["blk.3"]
    assert len(block) >= 2
    partial = copy_store(store, tmp_path, "partial")
    (partial / "fragments" / block[0]).unlink()  # it announces blk.3's other fragments one by one
    manifest = LocalLoader(store).manifest
    name = next(t.name for t in manifest.layer_tensors(3, 3) if block[0] not in manifest.fragments_for([t.name]))
    # The full peer joins second, so its provider records are stored at the partial one.
    with peer(partial) as part, peer(store, bootstrap=boot_of(part)) as full:
        full.kill()  # its region records linger in the DHT; its HTTP server is gone
        loader = P2PLoader(part.line("p2p://"), cache_dir=tmp_path / "cache", attempts=3, warn=lambda w: None)
        try:
            got = loader.load_tensor(name)
        finally:
            loader.close()
    np.testing.assert_array_equal(got, LocalLoader(store).load_tensor(name))
