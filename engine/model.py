"""The LLaMA forward pass over weights from any loader, for all layers or a contiguous span.

One clear pass, as in llama2.c's run.c, in batched form (T positions at a time):

    x = embed(tokens)                                   (T, dim)
    for each block:
        h = rms_norm(x) ; q, k, v = h Wq, h Wk, h Wv    (T, H, hd) (T, KV, hd)
        q, k = rope(q), rope(k) ; cache[k, v] at pos    (layer, position, KV, hd)
        x += attention(q, cache) Wo
        h = rms_norm(x) ; x += (silu(h Wg) * h Wu) Wd
    logits = rms_norm(x) Wout                           (T, vocab)

A span of blocks (say 10-19) loads only its own tensors and maps hidden states to hidden states,
so a node can serve part of a model; the embedding and the head live with the first and last block.
"""

from __future__ import annotations

import re

from dataclasses import dataclass

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType

from common import compute
from common.errors import UserError
from engine import ops, q8_0_stacks
from engine.backends import make_backend, round_to_f16
from engine.config import LlamaConfig
from engine.kv_cache import KVCache
from engine.weights_source import WeightSource

BLOCK_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BLOCK_NORMS = ("attn_norm", "ffn_norm")
GLOBAL_TENSORS = frozenset({"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"})
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.")
_PLAIN_TYPES = {"F32", "F16"}
PROMPT_CHUNK = 512  # positions per batched pass (llama.cpp's default batch)


def _computable(type_name: str) -> bool:
    """Types the engine can compute with: plain floats and everything gguf-py can dequantize."""
    if type_name in _PLAIN_TYPES:
        return True
    qtype = GGMLQuantizationType.__members__.get(type_name)
    return qtype is not None and hasattr(quants._type_traits.get(qtype), "dequantize_blocks")


def _return_freed_memory() -> None:
    """Give the temporaries of loading back to the OS.

    After large frees glibc raises its mmap threshold (up to 32 MB), so per-tensor temporaries
    made while loading land on the heap and stay resident once freed: 650 MB of a 1.17 GB model.
    malloc_trim releases them; without glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _row_reader(weight):
    """For a head weight, a function tokens (T,) -> its rows (T, in) as float32, exactly what
    dequantizing the stored rows gives (so a tied embedding can read the head's copy), or None."""
    from engine.backends import DenseWeight, Q8Weight

    if isinstance(weight, Q8Weight):  # value = q * d in float32, as gguf-py's Q8_0 dequantize computes it
        return lambda t: weight.qs[t].astype(np.float32) * np.repeat(weight.d[t], 32, axis=1)
    if isinstance(weight, DenseWeight):
        return lambda t: weight.values[t].astype(np.float32, copy=False)
    from engine.quant_weights import QuantWeight

    if isinstance(weight, QuantWeight):  # the stored blocks
        qtype = GGMLQuantizationType[weight.ggml_type]
        return lambda t: quants.dequantize(weight.blocks[t], qtype).astype(np.float32).reshape(len(t), -1)
    return None


@dataclass
class Block:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: object          # attn_q, attn_k, attn_v: one input, three outputs
    attn_output: object
    gate_up: object      # ffn_gate, ffn_up
    ffn_down: object


class LlamaModel:
    def __init__(self, loader: WeightSource, backend: str = "numpy", layers: tuple[int, int] | None = None,
                 emulate_llama_cpp: bool = False, edges_only: bool = False, edges: bool = True):
        """Load all blocks, a span ``layers=(first, last)``, or with ``edges_only`` no block at all:
        just the embedding and the head, for a client whose blocks run on other nodes. With
        ``edges=False`` a span holding block 0 or the last block loads neither the embedding nor
        the head (a swarm node: its clients hold the edges)."""
        if edges_only and not edges:
            raise ValueError("edges_only=True holds nothing but the edges: edges=False contradicts it")
        # On the process's compute thread when a server has started one (common.compute): the
        # kernels that loading runs must enter OpenMP from the thread that will step the model.
        compute.run(self._load, loader, backend, layers, emulate_llama_cpp, edges_only, edges)

    def _load(self, loader, backend: str, layers, emulate_llama_cpp: bool, edges_only: bool, edges: bool) -> None:
        self.loader = loader
        self.config = cfg = LlamaConfig.from_metadata(loader.metadata, loader.where)
        first, last = layers if layers is not None else (0, cfg.n_layers - 1)
        if not 0 <= first <= last < cfg.n_layers:
            raise UserError(f"{loader.where}: layer span {first}-{last} is outside 0-{cfg.n_layers - 1}")
        if edges_only:
            first, last = 0, -1  # an empty span: no block, both edges
        self.first_layer, self.last_layer = first, last
        self.has_embedding = edges and first == 0
        self.has_head = edges_only or (edges and last == cfg.n_layers - 1)
        self.emulate = emulate_llama_cpp
        names = set(loader.manifest.tensor_names())
        try:
            self._check_tensors(names)  # and starts reading (and hashing) ahead, while the kernels load
            self.backend = make_backend(backend, emulate_llama_cpp=emulate_llama_cpp)
            self._load_weights(names)
        finally:
            loader.release()  # the loader's fragments: what we need is in our own arrays now (or it failed)
        _return_freed_memory()

    # -- loading ----------------------------------------------------------------------------------
    def _load_weights(self, names: set[str]) -> None:
        loader, cfg = self.loader, self.config
        layers = range(self.first_layer, self.last_layer + 1)
        # All Q8_0 (numba): straight into the decode step's stacked arrays, one write per weight.
        self._stacks = q8_0_stacks.Q8Stacks(loader, layers) if q8_0_stacks.applies(loader, self.backend, layers) else None
        self.blocks = [self._load_block(i) for i in layers]
        self._stacks = None
        self.rope_freq_factors = (loader.load_tensor("rope_freqs.weight").astype(np.float64)
                                  if "rope_freqs.weight" in names else None)
        self._rope_table: tuple[np.ndarray, np.ndarray] | None = None  # cos, sin of positions 0.., grown on use
        self._tied_rows = None  # tokens -> rows of the head's weight, when the embedding is tied to it
        if self.has_head:
            self.output_norm = loader.load_tensor("output_norm.weight")
            tied = "output.weight" not in names  # no head of its own: the head is the token embedding
            head = "output.weight" if not tied else "token_embd.weight"
            self.output = self.backend.prepare(loader, head)
            if tied and self.has_embedding:  # one copy for both: the embedding reads the head's rows
                self._tied_rows = _row_reader(self.output)
        if self.has_embedding and self._tied_rows is None:
            # Kept as stored (quantized rows): a token looks up and dequantizes one row only.
            self.embedding_rows, self.embedding_type = loader.load_quantized("token_embd.weight")
        # The backend's one-call single-token step, if it has one for these weights (else None).
        self.decoder = self.backend.make_decoder(self.blocks, cfg)

    # -- loading ----------------------------------------------------------------------------------
    def _needed_tensors(self, names: set[str]) -> list[str]:
        needed = [f"blk.{i}.{t}.weight" for i in range(self.first_layer, self.last_layer + 1)
                  for t in BLOCK_MATRICES + BLOCK_NORMS]
        if self.has_head:
            needed.append("output_norm.weight")
            if "output.weight" in names:
                needed.append("output.weight")
        if self.has_embedding or (self.has_head and "output.weight" not in names):
            needed.append("token_embd.weight")
        return needed  # in the order they load

    def _expected_shape(self, name: str) -> tuple[int, ...]:
        """The numpy (out, in) shape the metadata implies for a tensor, as llama.cpp requires it."""
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        kind = name.split(".")[-2]
        return {"attn_q": (q, c.dim), "attn_k": (kv, c.dim), "attn_v": (kv, c.dim), "attn_output": (c.dim, q),
                "ffn_gate": (c.ffn_dim, c.dim), "ffn_up": (c.ffn_dim, c.dim), "ffn_down": (c.dim, c.ffn_dim),
                "attn_norm": (c.dim,), "ffn_norm": (c.dim,), "output_norm": (c.dim,),
                "token_embd": (c.vocab_size, c.dim), "output": (c.vocab_size, c.dim)}[kind]

    def _check_tensors(self, names: set[str]) -> None:
        n = self.config.n_layers
        beyond = sorted({int(m.group(1)) for m in map(_BLOCK_NAME.match, names) if m} - set(range(n)))
        if beyond:  # the metadata undercounts the blocks: running fewer would give wrong text, silently
            raise UserError(f"{self.loader.where}: the model holds tensors of block {beyond[0]}, but its metadata "
                            f"{self.loader.metadata.get('general.architecture')}.block_count is {n}")
        known = GLOBAL_TENSORS | {f"blk.{i}.{t}.weight" for i in range(n) for t in BLOCK_MATRICES + BLOCK_NORMS}
        unknown = [name for name in self.loader.manifest.tensor_names() if name not in known]
        if unknown:  # a tensor the pass would not apply (a bias, an expert): the text would be wrong, silently
            name = unknown[0]
            what = "biases are" if name.endswith(".bias") else "this tensor is"
            raise UserError(f"{self.loader.where}: tensor {name!r} is not part of the LLaMA this engine runs "
                            f"({what} not supported; running without it would give wrong text)")
        if "rope_freqs.weight" in names:
            self._check_tensor("rope_freqs.weight", (self.config.rope_dim // 2,))
        for name in self._needed_tensors(names):
            if name not in names:
                raise UserError(f"{self.loader.where}: tensor {name!r} is missing from the model")
            self._check_tensor(name, self._expected_shape(name))
        # Fragments in the order the tensors load (blocks, then the edges), for the read-ahead.
        order = {f: None for name in self._needed_tensors(names) for f in self.loader.manifest.fragments_for([name])}
        self.loader.prefetch(list(order))

    def _check_tensor(self, name: str, expected: tuple[int, ...]) -> None:
        entry = self.loader.tensor_entry(name)
        if not _computable(entry.ggml_type):
            raise UserError(f"{self.loader.where}: tensor {name!r} has type {entry.ggml_type}, which this "
                            f"engine cannot compute with")
        if tuple(entry.shape) != expected:  # a wrong shape would crash or silently misread later
            raise UserError(f"{self.loader.where}: tensor {name!r} has shape {tuple(entry.shape)}, but the "
                            f"model's metadata implies {expected}")

    def _load_block(self, i: int) -> Block:
        get = self.loader.load_tensor
        prefix = f"blk.{i}."
        name = lambda m: f"{prefix}{m}.weight"  # noqa: E731
        if self._stacks is not None:
            w = self._stacks.load(self.loader, i)
            return Block(attn_norm=get(name("attn_norm")), ffn_norm=get(name("ffn_norm")),
                         qkv=w["qkv"], attn_output=w["o"], gate_up=w["gu"], ffn_down=w["down"])
        be = self.backend
        return Block(attn_norm=get(name("attn_norm")), ffn_norm=get(name("ffn_norm")),
                     qkv=be.prepare_fused(self.loader, [name("attn_q"), name("attn_k"), name("attn_v")]),
                     attn_output=be.prepare(self.loader, name("attn_output")),
                     gate_up=be.prepare_fused(self.loader, [name("ffn_gate"), name("ffn_up")]),
                     ffn_down=be.prepare(self.loader, name("ffn_down")))

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, max_positions: int | None = None):
        """A ``Session`` (feed tokens, get logits; rewind; close) over this whole local model."""
        from engine.session import LocalSpanSession, RoutedSession

        if not (self.has_embedding and self.has_head and self.blocks):
            raise RuntimeError("only a model holding every block can open a local session")
        return RoutedSession(self, [LocalSpanSession(self, max_positions)])

    def new_cache(self, max_positions: int | None = None, dtype=None) -> KVCache:
        """A KV cache for this model's blocks, of the backend's element type unless ``dtype`` is given."""
        cfg = self.config
        n = min(max_positions or cfg.context_length, cfg.context_length)
        return KVCache(len(self.blocks), n, cfg.n_kv_heads, cfg.head_dim, dtype=dtype or self.backend.kv_dtype)

    # -- the pass ---------------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        # tokens: (T,) -> (T, dim)
        if not self.has_embedding:
            raise RuntimeError("this span does not hold the token embedding")
        tokens = np.asarray(tokens, dtype=np.int64)
        vocab = self.config.vocab_size  # token_embd's rows (checked at load)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise UserError(f"token id out of range 0-{vocab - 1}")
        if self._tied_rows is not None:
            return self._tied_rows(tokens)
        rows = self.embedding_rows[tokens]
        if self.embedding_type == GGMLQuantizationType.F32:
            return rows.view(np.float32).reshape(len(tokens), -1).copy()
        return quants.dequantize(rows, self.embedding_type).astype(np.float32).reshape(len(tokens), -1)

    def forward_layers(self, x: np.ndarray, cache: KVCache, first_pos: int) -> np.ndarray:
        """Hidden states (T, dim) at positions first_pos.. through this model's blocks.

        Long prompts go through PROMPT_CHUNK positions at a time (as llama.cpp's batches do), so
        memory stays bounded: attention scores are (heads, chunk, positions), never
        (positions x positions)."""
        steps = self.forward_layers_steps(x, cache, first_pos)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def forward_token(self, x: np.ndarray, cache: KVCache, pos: int) -> np.ndarray:
        """``forward_layers`` for one position: x (1, dim) -> (1, dim), the same result, without
        its generators. A node relaying decode steps calls this once per token on a core that has
        just woken, where every layer of Python costs tens of microseconds
        (docs/distributed-performance.md, "2 Dec, later")."""
        if self.decoder is None or cache.k.dtype != self.decoder.kv_dtype or pos + 1 > cache.capacity:
            return self.forward_layers(x, cache, pos)
        cos, sin = self._rope(pos, 1)
        y = self.decoder.step(x, pos, cache, cos[0], sin[0])
        cache.length = pos + 1
        return y

    def forward_layers_steps(self, x: np.ndarray, cache: KVCache, first_pos: int):
        """``forward_layers`` as a generator that yields (None) after each block of a multi-row pass
        and returns the hidden states: a server computing on its event loop's thread answers other
        requests between blocks of a long prompt. The work, and so the result, is the same."""
        T = x.shape[0]
        if first_pos + T > cache.capacity:
            raise UserError(f"context full: {first_pos + T} positions exceed the cache's {cache.capacity}")
        out = []
        for i in range(0, T, PROMPT_CHUNK):
            if i:
                yield
            out.append((yield from self._forward_chunk(x[i:i + PROMPT_CHUNK], cache, first_pos + i)))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def rope_table(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The table ``_rope`` reads, grown to hold positions 0..end-1 at least: cos, sin (n >= end,
        rope_dim // 2), float32, row p the angles of position p (for a compiled caller that indexes
        it itself: a node's relay step, swarm/relay_kernel.py)."""
        self._rope(0, end)
        return self._rope_table

    def _rope(self, first_pos: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (T, rope_dim // 2) for positions first_pos.., from a table of every position so
        far, doubled as positions grow (up to the context): computing them took 70 us a decode step,
        paid again at every node of a route. A position's angles are computed alone, element by
        element, so the table holds what a call for that position would give."""
        cfg, end = self.config, first_pos + T
        if self._rope_table is None or len(self._rope_table[0]) < end:
            have = 0 if self._rope_table is None else len(self._rope_table[0])
            n = max(end, min(max(2 * have, 256), cfg.context_length))
            self._rope_table = ops.rope_angles(np.arange(n), cfg.rope_dim, cfg.rope_base, cfg.rope_scale,
                                               self.rope_freq_factors)
        cos, sin = self._rope_table
        return cos[first_pos:end], sin[first_pos:end]

    def _forward_chunk(self, x: np.ndarray, cache: KVCache, first_pos: int):
        # a generator: yields after each block of a multi-row pass, returns (T, dim)
        cfg = self.config
        T = x.shape[0]
        if T == 1 and self.decoder is not None and cache.k.dtype == self.decoder.kv_dtype:
            return self.forward_token(x, cache, first_pos)  # (the backend's one-call step)
        cos, sin = self._rope(first_pos, T)
        mm, mm_fused = self.backend.matmul, self.backend.matmul_fused
        for li, b in enumerate(self.blocks):
            if li:
                yield
            h = ops.rms_norm(x, b.attn_norm, cfg.rms_eps)
            q, k, v = mm_fused(h, b.qkv)
            q = q.reshape(T, cfg.n_heads, cfg.head_dim)
            k = k.reshape(T, cfg.n_kv_heads, cfg.head_dim)
            v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            if self.emulate:  # llama.cpp keeps K/V in F16 and converts Q to F16 for Q.K
                q, k, v = round_to_f16(q), round_to_f16(k), round_to_f16(v)
            keys, values = cache.store(li, first_pos, k, v)
            att = self.backend.attention(q, keys, values, first_pos)
            x = x + mm(att.reshape(T, -1), b.attn_output)
            h = ops.rms_norm(x, b.ffn_norm, cfg.rms_eps)
            gate, up = mm_fused(h, b.gate_up)
            x = x + mm(ops.swiglu(gate, up), b.ffn_down)
        cache.length = first_pos + T
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        # x: (T, dim) -> logits (T, vocab)
        return self.backend.matmul(ops.rms_norm(x, self.output_norm, self.config.rms_eps), self.output)

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Feed tokens after what the cache holds; logits for the last position (or all)."""
        first_pos = cache.length
        x = self.forward_layers(self.embed(tokens), cache, first_pos)
        return self.head(x if all_logits else x[-1:])
