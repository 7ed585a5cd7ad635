"""The tensor table of a GGUF file: each tensor's name, type, shape and where its bytes are, read without the
data. Any ggml type (transformers' reader refuses Q5_0, which llama.cpp's K-quant mixtures use), and fast on a
262k-token vocabulary (gguf.GGUFReader builds an array view per string: ~25 s for Gemma 3). A file that is
not a GGUF, or ends inside its header or tensor data, is a clear error."""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ..errors import TunebookError

# metadata value type -> struct format (numbers and bool); 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFFileError(TunebookError):
    """The file is not a whole GGUF file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # rows first (torch order)
    offset: int             # from the start of the file
    nbytes: int


def read_table(path: Path) -> tuple[dict, list[TensorEntry]]:
    """(metadata without its string arrays, the tensors). Raises GGUFFileError for a damaged file."""
    path = Path(path)
    fix = "    fix: the file is damaged or was cut short: export it again (tunebook export RUN --force)"
    with open(path, "rb") as f:
        try:
            blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFFileError(f"{path} is empty, not a GGUF file\n{fix}") from None
    with blob:
        if blob[:4] != b"GGUF":
            raise GGUFFileError(f"{path} is not a GGUF file (it starts with {bytes(blob[:4])!r})\n{fix}")
        try:
            metadata, entries, data_start = _parse(blob)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise GGUFFileError(f"{path}: its header cannot be read ({exc})\n{fix}") from None
        size = len(blob)
    tensors = [TensorEntry(name, qtype, shape, data_start + offset, _nbytes(qtype, shape))
               for name, qtype, shape, offset in entries]
    for t in tensors:
        if t.offset + t.nbytes > size:
            raise GGUFFileError(f"{path} ends inside tensor {t.name} ({size} bytes, the tensor ends at "
                                f"{t.offset + t.nbytes})\n{fix}")
    return metadata, tensors


def _parse(blob) -> tuple[dict, list[tuple], int]:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}, expected 2 or 3")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _string(blob, pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _value(blob, pos + 4, kind)
    entries = []
    for _ in range(n_tensors):
        name, pos = _string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, QT(kind), tuple(reversed(dims)), offset))
    alignment = metadata.get("general.alignment", 32)
    return metadata, entries, (pos + alignment - 1) // alignment * alignment


def _string(blob, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", blob, pos)
    if pos + 8 + n > len(blob):
        raise ValueError("a string runs past the end of the file")
    return blob[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(blob, pos: int, kind: int):
    if kind in _SCALARS:
        return struct.unpack_from(_SCALARS[kind], blob, pos)[0], pos + struct.calcsize(_SCALARS[kind])
    if kind == 8:
        return _string(blob, pos)
    if kind == 9:
        element, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element in _SCALARS:
            width = struct.calcsize(_SCALARS[element])
            values = list(struct.unpack_from(f"<{count}{_SCALARS[element][1]}", blob, pos))
            return values, pos + count * width
        if element != 8:
            raise ValueError(f"an array of metadata type {element}")
        for _ in range(count):  # a vocabulary: walked, not kept
            (n,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + n
        return count, pos
    raise ValueError(f"metadata value of type {kind}")


def _nbytes(qtype: QT, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size
