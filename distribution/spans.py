"""Which tensors, fragments and DHT regions belong to a span of transformer blocks.

A *region* is the unit peers announce in the DHT: "header" (the GGUF header), "blk.N" (block N)
or "globals" (the embedding, output norm, head and any other tensor outside a block). The
fragmenter cuts the file at every region boundary, so every fragment lies inside exactly one
region; announcing a region says "I hold every fragment of it", and a client finds the holders of
a block with one lookup instead of one per fragment (docs/p2p-scale.md).
"""

from __future__ import annotations

from bisect import bisect_right

from common.errors import UserError
from fragmenter.manifest import Manifest

HEADER = "header"
GLOBALS = "globals"


def parse_spans(text: str) -> list[tuple[int, int]]:
    """'0-9,20-29' -> [(0, 9), (20, 29)]."""
    spans = []
    for part in text.split(","):
        try:
            first, last = (int(x) for x in part.split("-"))
        except ValueError:
            raise UserError(f"--layers {text!r}: expected spans like 0-14 or 0-9,20-29") from None
        if first > last or first < 0:
            raise UserError(f"--layers {text!r}: span {part} is empty or negative")
        spans.append((first, last))
    return spans


def block_ranges(blocks: list[int]) -> str:
    """[10, 11, 12, 20] -> '10-12, 20'."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}-{b}" if b != start else f"{b}")
            start = None
    return ", ".join(out)


def block_count(manifest: Manifest) -> int:
    return 1 + max((t.layer for t in manifest.tensors if t.layer is not None), default=-1)


def span_tensors(manifest: Manifest, spans: list[tuple[int, int]]) -> list[str]:
    """Tensors a node serving these block spans holds: the blocks, plus the embedding with block 0
    and the output norm and head (or the tied embedding) with the last block."""
    n_layers = block_count(manifest)
    beyond = [f"{first}-{last}" for first, last in spans if last >= n_layers]
    if beyond:  # (a span past the end would quietly give the header and globals only)
        raise UserError(f"--layers {','.join(beyond)}: this model has blocks 0-{n_layers - 1}")
    names = set()
    for first, last in spans:
        names.update(t.name for t in manifest.layer_tensors(first, last))
        if first == 0:
            names.add("token_embd.weight")
        if last >= n_layers - 1:
            names.update({"output_norm.weight", "output.weight", "token_embd.weight"})
    known = set(manifest.tensor_names())
    return sorted(names & known)


def region_of_tensor(name: str, layer: int | None) -> str:
    return GLOBALS if layer is None else f"blk.{layer}"


def fragment_regions(manifest: Manifest) -> dict[str, list[str]]:
    """region -> the ids of its fragments, in file order.

    Placed by file offset rather than by the tensors' pieces, so that a fragment holding only
    alignment padding still has a region. A fragment whose bytes occur in two regions (identical
    content) is listed under both.
    """
    data_offset = manifest.gguf.get("data_offset", 0)
    starts = sorted((t.offset, region_of_tensor(t.name, t.layer)) for t in manifest.tensors)
    offsets = [s for s, _ in starts]
    regions: dict[str, list[str]] = {}
    for f in manifest.fragments:
        if f.offset < data_offset or not starts:
            region = HEADER
        else:
            region = starts[max(bisect_right(offsets, f.offset) - 1, 0)][1]
        ids = regions.setdefault(region, [])
        if f.id not in ids:
            ids.append(f.id)
    return regions


def regions_of_fragments(manifest: Manifest) -> dict[str, list[str]]:
    """fragment id -> the regions it belongs to (one, unless its bytes repeat elsewhere)."""
    out: dict[str, list[str]] = {}
    for region, ids in fragment_regions(manifest).items():
        for fid in ids:
            out.setdefault(fid, []).append(region)
    return out


def complete_regions(manifest: Manifest, held: set[str]) -> tuple[list[str], list[str]]:
    """(regions all of whose fragments are in ``held``, held fragments outside those regions).

    What a peer announces: one key per complete region, and one per fragment for the rest (a peer
    that lacks one fragment of a block still offers the others)."""
    regions = fragment_regions(manifest)
    full = [r for r, ids in regions.items() if all(f in held for f in ids)]
    covered = {f for r in full for f in regions[r]}
    return full, sorted(held - covered)
