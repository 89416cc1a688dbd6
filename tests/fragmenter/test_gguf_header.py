"""The stream header parser agrees with gguf-py's reader and names damage clearly."""

import io
import struct

import numpy as np
import pytest
from gguf import GGUFReader
from hypothesis import given, settings
from hypothesis import strategies as st

from fragmenter.gguf_header import GGUFFormatError, UndecodedStrings, parse_header, read_file_header


def test_parser_matches_gguf_reader_on_every_factory_model(factory_models):
    for name, path in factory_models.items():
        header, size = read_file_header(str(path))
        reader = GGUFReader(path)
        assert header.data_offset == reader.data_offset, name
        assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
        for ours, theirs in zip(header.tensors, reader.tensors):
            assert ours.ggml_type == int(theirs.tensor_type)
            assert list(ours.dims) == [int(d) for d in theirs.shape]
            assert header.data_offset + ours.offset == theirs.data_offset
            assert ours.n_bytes == theirs.n_bytes
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = header.metadata[key]
            expected = field.contents()
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, np.asarray(expected)), key
            else:
                assert value == expected or np.isclose(value, expected), key


def test_default_model_header(default_gguf):
    header, size = read_file_header(str(default_gguf))
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["tokenizer.ggml.model"] == "gpt2"
    assert size == header.tensor_extent() or size > header.tensor_extent()


def test_skipping_string_arrays_changes_nothing_else(default_gguf):
    """The fragmenter's fast parse: string arrays are skipped but counted, everything else equal."""
    full, size = read_file_header(str(default_gguf))
    fast, fast_size = read_file_header(str(default_gguf), decode_strings=False)
    assert (fast.data_offset, fast.tensors, fast_size) == (full.data_offset, full.tensors, size)
    skipped = {k for k, v in fast.metadata.items() if isinstance(v, UndecodedStrings)}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"} <= skipped
    for key, value in full.metadata.items():
        if key in skipped:
            assert all(isinstance(v, str) for v in value) and len(fast.metadata[key]) == len(value)
        elif isinstance(value, np.ndarray):
            assert np.array_equal(fast.metadata[key], value)
        else:
            assert fast.metadata[key] == value


def test_not_gguf():
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        parse_header(io.BytesIO(b"PK\x03\x04 this is a zip"), "x.gguf")


def _two_tensor_file(tmp_path, **metadata) -> bytes:
    from gguf import GGUFWriter

    path = tmp_path / "two.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        w.add_string(key, value)
    w.add_tensor("a", np.arange(32, dtype=np.float32))
    w.add_tensor("b", np.arange(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_tensors_sharing_bytes_are_refused(tmp_path):
    """llama.cpp refuses a tensor placed over another's bytes; so do we (the engine ran it, reading
    one tensor's weights as another's, and said nothing)."""
    data = bytearray(_two_tensor_file(tmp_path))
    parse_header(io.BytesIO(bytes(data)), "ok.gguf")
    at = data.index(struct.pack("<Q", 1) + b"b") + 9 + 4 + 8 + 4  # name, n_dims, one dim, type: then offset
    assert struct.unpack_from("<Q", data, at)[0] == 128
    struct.pack_into("<Q", data, at, 96)  # aligned, but inside "a" (0-128)
    with pytest.raises(GGUFFormatError, match="overlap.gguf: tensor 'b' at data offset 96 overlaps tensor 'a'"):
        parse_header(io.BytesIO(bytes(data)), "overlap.gguf")


def test_an_alignment_that_is_not_a_number_is_named(tmp_path):
    data = _two_tensor_file(tmp_path, **{"general.alignment": "x"})
    with pytest.raises(GGUFFormatError, match="general.alignment 'x' is not a power of two"):
        parse_header(io.BytesIO(data), "a.gguf")


def test_unsupported_version():
    data = b"GGUF" + struct.pack("<IQQ", 7, 0, 0)
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version 7"):
        parse_header(io.BytesIO(data), "v7.gguf")


@settings(max_examples=60, deadline=None)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_a_clear_error(factory_models, tmp_path_factory, cut):
    """Cutting a file anywhere gives GGUFFormatError, never another exception or a silent success."""
    path = factory_models["q8_0-spm-gqa"]
    data = path.read_bytes()
    short = tmp_path_factory.mktemp("trunc") / "short.gguf"
    short.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(GGUFFormatError, match="truncated|not a GGUF"):
        read_file_header(str(short))
