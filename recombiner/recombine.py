"""Rebuild the original GGUF file from a store, or verify a store without writing anything.

Both work through the loader interface, so they apply to any backend (a directory today, a web
server or peers tomorrow). The rebuilt file is checked against the source's SHA-256 before it is given
its final name; verify checks every fragment against its own SHA-256 as well.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import StoreError, UserError, naming
from common.files import output_target, remove_leftovers
from common.hashing import BackgroundSHA256
from common.progress import byte_progress
from distribution.base import FragmentError, FragmentLoader, MissingFragment


@dataclass
class RecombineResult:
    path: Path
    size: int
    sha256: str
    seconds: float
    table: str | None = None  # how the manifest's tensor table disagrees with the rebuilt header, if it does

    def summary(self) -> str:
        rate = self.size / self.seconds / 1e6 if self.seconds > 0 else float("inf")
        return (f"rebuilt {self.path}: {self.size / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s), "
                f"sha256 {self.sha256[:16]}... matches the source")

    def warning(self) -> str | None:
        """The file is the original (its SHA-256 says so), but the store's manifest is not to be
        trusted: --verify, infer and serve refuse the store; this says so too."""
        if self.table is None:
            return None
        return (f"warning: {self.path} is the original file, but the store's manifest tensor table does not "
                f"describe it ({self.table}); other commands refuse this store")


def recombine(loader: FragmentLoader, out_path: str | Path, progress: bool | None = None) -> RecombineResult:
    """Write the store's original file to ``out_path``; raises StoreError on any bad fragment.

    One SHA-256 pass, of the whole file, checks everything: every fragment is a slice of the
    source, so the rebuilt file hashes to the source's SHA-256 only if every fragment is intact.
    Only when it does not are the fragments hashed one by one, to name the damaged ones.
    """
    started = time.perf_counter()
    out = output_target(out_path)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    _refuse_inside_store(loader, out)
    m = loader.manifest
    remove_leftovers(out.parent, _temp_prefix(out))
    tmp = out.with_name(f"{_temp_prefix(out)}{os.getpid()}")
    loader.prefetch(m.unique_fragments())
    try:
        with naming(out, "create"):  # (the user's name, not the temporary one)
            dest = open(tmp, "wb", buffering=0)
        with dest, BackgroundSHA256() as whole, \
                byte_progress(m.source["size"], f"recombine {m.source['name']}", progress) as bar:
            write = _writer(dest, out)
            for frag in m.fragments:
                with loader.open_unverified(frag.id) as src:
                    if _stream(src, frag.size, write, whole, bar) != frag.size:
                        raise StoreError(f"{loader.where}: {loader.describe(frag.id)} shrank while being read")
            digest = whole.hexdigest()
        if digest != m.source["sha256"]:
            raise _name_the_damage(loader, digest)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # as verify: the header came out intact; the table beside it must agree
        loader.header()
        table = None
    except StoreError as e:
        table = _strip_where(str(e), loader.where)
    return RecombineResult(out, m.source["size"], digest, time.perf_counter() - started, table)


def _writer(dest, path: Path):
    """dest.write, with a failure (a full disk) reported naming the file being written."""
    def write(data) -> None:
        with naming(path):
            dest.write(data)
    return write


def _temp_prefix(out: Path) -> str:
    """Temporary name of a rebuild: .<name>.partial-<pid>, so a later run can clear a killed run's."""
    return f".{out.name}.partial-"


def _refuse_inside_store(loader: FragmentLoader, out: Path) -> None:
    """Writing the rebuilt file into the store being read (onto manifest.json, or a fragment) would
    replace what it is read from; refuse any output under the store directory, or that is the same
    file as one of its files under another name (a hard link or a symlinked directory)."""
    store = getattr(loader, "store", None)
    if store is None:
        return
    store = Path(store).resolve()
    target = out.resolve()
    if target == store or store in target.parents:
        raise UserError(f"{out}: is inside the store being read ({store}); write the rebuilt file elsewhere")
    if target.exists():
        ours = [store / "manifest.json"] + [store / "fragments" / fid for fid in loader.manifest.unique_fragments()]
        if any(p.exists() and os.path.samefile(p, target) for p in ours):
            raise UserError(f"{out}: is a file of the store being read ({store}); write the rebuilt file elsewhere")


def _stream(src, length: int, use, whole: BackgroundSHA256, bar) -> int:
    """Pass up to ``length`` bytes of ``src`` to ``use`` in cache-sized chunks while ``whole``
    hashes them on the other core; returns how many there were."""
    done = 0
    while done < length:
        slot = whole.take()
        view = slot.view[: min(length - done, len(slot.view))]
        n = src.readinto(view)
        whole.submit(slot, n)  # from here on only read, by both threads at once
        if n == 0:
            break
        use(view[:n])
        done += n
        bar.update(n)
    return done


def _name_the_damage(loader: FragmentLoader, digest: str) -> StoreError:
    """The error for a rebuilt file with the wrong hash: which fragments are bad, if any."""
    report = verify(loader, progress=False)
    problems = report.missing + report.corrupt
    if problems:
        more = f" (and {len(problems) - 1} more; see recombine --verify)" if len(problems) > 1 else ""
        return StoreError(f"{loader.where}: {problems[0]}{more}; nothing written")
    return StoreError(f"{loader.where}: rebuilt file hashes to {digest[:16]}..., the source was "
                      f"{loader.manifest.source['sha256'][:16]}...; nothing written")


@dataclass
class VerifyReport:
    where: str
    fragments: int
    missing: list[str] = field(default_factory=list)   # messages, one per fragment
    corrupt: list[str] = field(default_factory=list)
    whole_file_ok: bool | None = None                  # None: not checkable (fragments bad)
    table: str | None = None                           # how the tensor table disagrees with the header

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt and self.whole_file_ok is True and self.table is None

    def lines(self) -> list[str]:
        out = [f"missing: {msg}" for msg in self.missing] + [f"corrupt: {msg}" for msg in self.corrupt]
        if self.table is not None:
            out.append(f"{self.where}: the fragments and the whole file's SHA-256 are intact, but the manifest's "
                       f"tensor table does not describe them: {self.table}")
        elif self.whole_file_ok is True:
            out.append(f"{self.where}: all {self.fragments} fragments verified; the whole file's SHA-256 "
                       f"matches the source")
        elif self.whole_file_ok is False:
            out.append(f"{self.where}: fragments are intact but the whole file's SHA-256 does not match "
                       f"the source")
        else:
            out.append(f"{self.where}: {len(self.missing)} missing and {len(self.corrupt)} corrupt of "
                       f"{self.fragments} fragments; whole-file hash not checked")
        return out


def verify(loader: FragmentLoader, progress: bool | None = None) -> VerifyReport:
    """Check every fragment and the whole-file hash; never raises for bad fragments, lists them.

    Each fragment is hashed on this thread and the whole file on the other, from the same chunks.
    """
    m = loader.manifest
    report = VerifyReport(loader.where, len(m.unique_fragments()))
    checked: set[str] = set()
    bad: set[str] = set()
    loader.prefetch(m.unique_fragments())
    with BackgroundSHA256() as whole, byte_progress(m.source["size"], "verify", progress) as bar:
        for frag in m.fragments:
            if frag.id in bad:
                continue
            digest = hashlib.sha256()
            try:
                with loader.open_unverified(frag.id) as src:
                    length = _stream(src, frag.size, digest.update, whole, bar)
                if length != frag.size:
                    raise loader.wrong_length(frag.id, length)
                if frag.id not in checked and digest.hexdigest() != frag.id:
                    raise loader.corrupt(frag.id)
                checked.add(frag.id)
            except MissingFragment as e:
                report.missing.append(_strip_where(str(e), loader.where))
                bad.add(frag.id)
            except FragmentError as e:
                report.corrupt.append(_strip_where(str(e), loader.where))
                bad.add(frag.id)
        source_hash = whole.hexdigest()
    if not bad:
        report.whole_file_ok = source_hash == m.source["sha256"]
    if report.whole_file_ok:
        try:  # the header is inside hash-checked fragments; the table beside it must agree
            loader.header()
        except StoreError as e:
            report.table = _strip_where(str(e), loader.where)
    return report


def _strip_where(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix):] if message.startswith(prefix) else message
