"""Reading shards: a small tar reader, WebDataset's grouping of members into samples, and the
member-name check that refuses names escaping their folder.

A shard is a plain tar of ``{key}.jpg`` members (``results/shards/{split}/shard-{i:05d}.tar``, see
``docs/design.md``). :func:`read_tar` reads ustar, GNU and PAX headers itself: several times
faster than ``tarfile`` per member, which matters for shards of small JPEGs (``bench/loader.py``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Iterator


class UnsafeMemberError(ValueError):
    """A tar member name that could escape the extraction folder (absolute path or ``..``)."""


def list_shards(shard_dir: str | Path, split: str) -> list[Path]:
    """The shard tars of ``split``, sorted by name; empty when the split has none."""
    folder = Path(shard_dir) / split
    return sorted(folder.glob("shard-*.tar")) if folder.is_dir() else []


def check_member_name(name: str, shard: str | Path) -> None:
    """Raise :class:`UnsafeMemberError` naming ``shard`` for an absolute or ``..`` member name."""
    if ".." not in name and not name.startswith(("/", "\\")) and "\\" not in name:
        return  # the common case, without building a path
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise UnsafeMemberError(
            f"{shard}: unsafe tar member name {name!r} (absolute path or '..'); "
            "refusing to read this shard"
        )


class ShardError(ValueError):
    """A shard that is not a readable tar file (truncated, corrupt header)."""


def _octal(field: bytes, url, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"{url}: corrupt tar header at byte {offset}") from None


def _pax_path(records: bytes, url, offset: int) -> str | None:
    """The ``path`` of a PAX extended header (records ``<length> <key>=<value>`` and a newline)."""
    path, i = None, 0
    try:
        while i < len(records):
            space = records.find(b" ", i)
            if space < 0:
                break
            length = int(records[i:space])
            if length <= 0:
                raise ValueError("bad record length")
            key, _, value = records[space + 1:i + length - 1].partition(b"=")
            if key == b"path":
                path = value.decode("utf-8")
            i += length
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"{url}: corrupt PAX header at byte {offset} ({exc})") from None
    return path


def read_tar(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar, in order; names checked with
    :func:`check_member_name`. A small reader of ustar/GNU/PAX headers (long names from PAX
    ``path`` or GNU ``L`` records): several times faster than ``tarfile`` per member, which
    matters for shards of small JPEGs. Corrupt headers (bad checksum) raise :class:`ShardError`."""
    with open(url, "rb", buffering=1 << 20) as fh:
        offset = 0
        long_name: str | None = None
        while True:
            header = fh.read(512)
            if len(header) < 512 or header == bytes(512):
                if 0 < len(header) < 512:
                    raise ShardError(f"{url}: truncated tar header at byte {offset}")
                return
            stored = _octal(header[148:156], url, offset)
            if stored != sum(header) - sum(header[148:156]) + 256:  # the checksum field counts as spaces
                raise ShardError(f"{url}: corrupt tar header at byte {offset} (checksum)")
            size = _octal(header[124:136], url, offset)
            kind = header[156:157]
            padded = size + (-size) % 512
            payload = fh.read(padded)  # the data and the padding to the next header, in one read
            if len(payload) < padded:
                raise ShardError(f"{url}: truncated member at byte {offset}")
            if padded != size:
                payload = payload[:size]
            at, offset = offset, offset + 512 + padded
            try:
                if kind == b"x":
                    long_name = _pax_path(payload, url, at) or long_name
                    continue
                if kind == b"L":
                    long_name = payload.rstrip(b"\0").decode("utf-8")
                    continue
                if kind in (b"g", b"K"):
                    continue
                name = long_name
                long_name = None
                if name is None:
                    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if header[257:262] == b"ustar" and prefix:
                        name = prefix.decode("utf-8") + "/" + name
            except UnicodeDecodeError:
                raise ShardError(f"{url}: member name at byte {at} is not UTF-8") from None
            check_member_name(name, url)
            if kind in (b"0", b"\0", b"7"):
                yield name, payload


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard, as WebDataset groups them: consecutive members sharing a key
    (the name up to the first dot of its base name) form ``{"__key__", "__url__", ext: bytes}``,
    extensions lower-cased; members without an extension are skipped, a repeated one is an error."""
    sample: dict | None = None
    for name, payload in read_tar(url):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash:
            continue
        key, ext = name[:dot], name[dot + 1:].lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        elif ext in sample:
            raise ValueError(f"{url}: duplicate member {name!r}")
        sample[ext] = payload
    if sample is not None:
        yield sample
