"""`serve` and `fetch` refuse bad input with one clear line, before doing anything."""

import json

from fragmenter.fragment import fragment_file
from tests.conftest import assert_one_line_error, run_cli


def test_serve_needs_a_store(tmp_path):
    assert_one_line_error(run_cli("serve", tmp_path, "--port", "0"), "manifest.json")


def test_serve_option_misuse(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 8192, progress=False)
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"), "--p2p")
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--p2p", "--layers", "five"), "--layers")
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--p2p", "--layers", "3-1"), "--layers")
    assert_one_line_error(run_cli("serve", tmp_path / "s", "--p2p", "--layers", ""), "--layers ''")


def test_fetch_copies_blocks_and_refuses_another_models_store(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "a", 8192, progress=False)
    fragment_file(str(factory_models["f16-spm-gqa"]), tmp_path / "b", 8192, progress=False)
    proc = run_cli("fetch", tmp_path / "a", "-o", tmp_path / "copy", "--layers", "1-1")
    assert proc.returncode == 0 and "fetched" in proc.stdout, proc.stderr
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == (tmp_path / "a" / "manifest.json").read_bytes()
    assert_one_line_error(run_cli("fetch", tmp_path / "b", "-o", tmp_path / "copy"), "another model")
    # an empty --layers is a mistake, not "every block" (it copied the whole store)
    assert_one_line_error(run_cli("fetch", tmp_path / "a", "-o", tmp_path / "empty", "--layers", ""), "--layers ''")
    assert not (tmp_path / "empty").exists()
    # the copy of one block is not mistaken for a damaged store
    assert_one_line_error(run_cli("infer", tmp_path / "copy", "-p", "hi"), "is missing", "fetch --layers")
    # a whole store missing its header fragment, or one block's in the middle, is damaged, not a copy
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    header = manifest["fragments"][0]["id"]
    (tmp_path / "a" / "fragments" / header).unlink()
    proc = run_cli("infer", tmp_path / "a", "-p", "hi")
    assert_one_line_error(proc, header[:16], "is missing")
    assert "fetch --layers" not in proc.stderr
    assert_one_line_error(run_cli("infer", "ftp://example.org/store", "-p", "hi"), "ftp:// is not a source")


def test_fetch_refuses_an_output_inside_its_source_and_blocks_the_model_lacks(factory_models, tmp_path):
    """A copy inside the store it reads would nest a second store in it (it did, exit 0); a span past
    the last block would copy the header alone (it did, exit 0). Nothing is written either way."""
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "a", 8192, progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (tmp_path / "a", tmp_path / "a" / "fragments", tmp_path / "a" / "x" / "y"):
        assert_one_line_error(run_cli("fetch", tmp_path / "a", "-o", out), "inside the store being read")
    assert_one_line_error(run_cli("fetch", tmp_path / "a", "-o", tmp_path / "c", "--layers", "40-50"),
                          "--layers 40-50", "this model has blocks 0-")
    assert_one_line_error(run_cli("serve", tmp_path / "a", "--p2p", "--port", "0", "--layers", "0-99"),
                          "--layers 0-99", "this model has blocks 0-")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_fetch_counts_what_it_wrote_repairs_and_leaves_nothing_when_it_fails(factory_models, tmp_path):
    """The summary says what was written and what was already there (it said 'fetched 35 of 35'
    when 25 were copied); a damaged fragment in the copy is written again; a fetch that fails
    into a new directory leaves no empty store skeleton behind."""
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "a", 8192, progress=False)
    total = len(list((tmp_path / "a" / "fragments").iterdir()))
    first = run_cli("fetch", tmp_path / "a", "-o", tmp_path / "copy")
    assert first.returncode == 0 and f"fetched {total} of {total}" in first.stdout, first.stderr
    assert f"{total} written" in first.stdout and "already there" not in first.stdout
    victim = sorted((tmp_path / "copy" / "fragments").iterdir())[3]
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    again = run_cli("fetch", tmp_path / "a", "-o", tmp_path / "copy")
    assert again.returncode == 0 and f"1 written, {total - 1} already there" in again.stdout, again.stdout
    assert victim.read_bytes() == (tmp_path / "a" / "fragments" / victim.name).read_bytes()

    broken = tmp_path / "broken"
    fragment_file(str(factory_models["q8_0-spm-gqa"]), broken, 8192, progress=False)
    sorted((broken / "fragments").iterdir())[-1].unlink()
    assert_one_line_error(run_cli("fetch", broken, "-o", tmp_path / "new"), "missing")
    assert not (tmp_path / "new").exists()


def test_serve_names_a_host_it_cannot_listen_on(factory_models, tmp_path):
    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 8192, progress=False)
    proc = run_cli("serve", tmp_path / "s", "--host", "999.1.1.1", "--port", "0", timeout=60)
    assert_one_line_error(proc, "999.1.1.1", "cannot listen")
    assert proc.returncode == 1


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /manifest.json HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /fragments/%ZZ HTTP/1.1\r\nHost: \x00\xff\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/9.9\r\n" + b"X: " + b"y" * 100_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello to a plain HTTP port
]


def test_serve_logs_one_line_per_malformed_request_and_keeps_serving(factory_models, tmp_path):
    import socket
    import urllib.request

    from tests.distribution.netutil import serving

    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 8192, progress=False)
    with serving(tmp_path / "s", "--port", "0") as server:
        host, port = server.url.split("//")[1].rstrip("/").split(":")
        for request in MALFORMED:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(10)
                try:
                    while sock.recv(65536):
                        pass
                except (ConnectionResetError, socket.timeout):
                    pass
        with urllib.request.urlopen(server.url + "manifest.json", timeout=10) as r:
            assert r.status == 200
    assert server.proc.returncode == 0
    assert not any("Traceback" in line for line in server.lines), server.lines
    assert not any(line.startswith(("File ", "^")) for line in server.lines), server.lines


def test_a_libp2p_port_already_listened_on_is_refused(factory_models, tmp_path):
    """py-libp2p binds with SO_REUSEPORT: a second peer on a taken --listen port started and
    shared it with the first (the kernel splitting connections between them). Refused now."""
    import socket

    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 8192, progress=False)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a libp2p listener does
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", tmp_path / "s", "--p2p", "--port", "0", "--listen", f"/ip4/127.0.0.1/tcp/{port}",
                       timeout=60)
    assert_one_line_error(proc, f"/ip4/127.0.0.1/tcp/{port}", "Address already in use")


def test_serve_p2p_on_a_taken_port_is_one_line_before_joining_the_dht(factory_models, tmp_path):
    """It joined the DHT first, then failed to bind, and printed 'stopped' before the error."""
    import socket

    fragment_file(str(factory_models["q8_0-spm-gqa"]), tmp_path / "s", 8192, progress=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", tmp_path / "s", "--p2p", "--port", port, timeout=60)
    assert_one_line_error(proc, f"--port {port}: cannot listen there")
    assert proc.stdout == ""  # no "stopped", no address: it never started
