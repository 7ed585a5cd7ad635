"""Where a stage's records come from: local files and folders, data inside an installed Python package
(`package:<module>`), or a hub dataset id.

Each record keeps the place it came from (`file:line`) so every complaint can point at it. Broken
input is handled here: a JSON array cut off mid-record keeps every complete record and says where it
was cut; a malformed record (bad JSON, nested too deep, a line over MAX_LINE_BYTES, not UTF-8, not an
object, a CSV row of the wrong width) and an unreadable file (empty, UTF-16/32, not Parquet) stop the run
naming file:line and the fix, or are counted and skipped with `on_bad_record: skip`. UTF-8 with a
byte-order mark and Windows line ends (CRLF) are read as they are.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.util
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import TunebookError, describe, foreign_encoding, reencode_fix

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
CHUNK_CHARS = 4 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024 * 1024  # one record of a JSON Lines or CSV file
BOM = b"\xef\xbb\xbf"
RECORD_FIX = ("correct that record, map its field names with data.fields, or set data.on_bad_record: skip to "
              "count and skip bad records")


@dataclass
class Record:
    row: dict
    where: str  # "path:line" or "dataset row N": where a user can find it


@dataclass
class BadRecords:
    """Records that cannot be used. `error` policy: the first one stops the run; `skip`: counted."""

    policy: str = "error"
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str, fix: str = RECORD_FIX) -> None:
        if self.policy == "error":
            raise TunebookError(f"{where}: {reason}\n    fix: {fix}")
        self.reasons[reason.split(" (")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    @property
    def count(self) -> int:
        return sum(self.reasons.values())


@dataclass
class SourceData:
    records: list[Record]
    truncation: str | None = None  # set when a file ended mid-record


@dataclass
class Source:
    """A resolved `data.source`: what to read and a cheap fingerprint of it (for the cache)."""

    spec: str
    kind: str                       # "files" | "hub"
    files: list[Path] = field(default_factory=list)
    display_root: Path | None = None  # file names are shown relative to this
    subset: str | None = None
    split: str = "train"
    _hub: Any = None

    def name(self, path: Path) -> str:
        if self.display_root is not None:
            try:
                return str(path.relative_to(self.display_root))
            except ValueError:
                pass
        return str(path)

    def fingerprint(self) -> str:
        if self.kind == "hub":
            return f"hub:{self.spec}:{self.subset}:{self.split}:{self._load_hub()._fingerprint}"
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()

    def read(self, bad: BadRecords) -> SourceData:
        if self.kind == "hub":
            ds = self._load_hub()
            return SourceData([Record(dict(row), f"{self.spec} row {i}") for i, row in enumerate(ds)])
        records: list[Record] = []
        notices = []
        for path in self.files:
            got, notice = read_file(path, self.name(path), bad)
            records += got
            if notice:
                notices.append(notice)
        return SourceData(records, "; ".join(notices) or None)

    def _load_hub(self):
        if self._hub is None:
            import datasets

            try:
                self._hub = datasets.load_dataset(self.spec, self.subset, split=self.split)
            except Exception as exc:  # offline, unknown id, missing split: all user-fixable
                raise TunebookError(
                    f"could not load dataset '{self.spec}' from the hub: {type(exc).__name__}: {exc}\n"
                    "    fix: check the id, subset and split; offline, download it and set data.source to the "
                    "local .jsonl/.json/.parquet/.csv file or folder") from None
        return self._hub


def _data_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                      and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts))
    except OSError as exc:
        raise TunebookError(f"{folder}: cannot list the folder ({exc.strerror}: {exc.filename})\n"
                            "    fix: check its permissions, or point data.source at a file") from None


def open_source(spec: str, recipe_dir: Path | None, subset: str | None = None, split: str = "train") -> Source:
    """Resolve `data.source`. Local paths are tried relative to the current directory, then to the
    recipe file's directory; a folder (or a `package:`) means every data file inside it, in name
    order; anything else that looks like `owner/name` is a hub dataset id."""
    if spec.startswith("package:"):
        return _package_source(spec)
    candidates = [Path(spec).expanduser()]
    if recipe_dir is not None and not Path(spec).is_absolute():
        candidates.append(recipe_dir / spec)
    for path in candidates:
        if path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise TunebookError(f"{path}: unsupported data file type '{path.suffix}'\n"
                                    f"    fix: use one of {', '.join(EXTENSIONS)}")
            return Source(spec, "files", [path])
        if path.is_dir():
            files = _data_files(path)
            if not files:
                raise TunebookError(f"{path}: folder has no data files\n"
                                    f"    fix: put {', '.join(EXTENSIONS)} files in it, or point data.source at a file")
            return Source(spec, "files", files, display_root=path.parent)
        if path.exists():
            raise TunebookError(f"{path}: not a regular file or folder (a pipe, a socket or a device)\n"
                                "    fix: point data.source at a data file or a folder of them")
    if Path(spec).suffix in EXTENSIONS or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        tried = " and ".join(dict.fromkeys(str(p.absolute()) for p in candidates))  # a looping link has no resolve()
        raise TunebookError(f"data file not found: {spec} (tried {tried})\n"
                            "    fix: check the path; relative paths are read from the current directory, "
                            "then from the recipe's directory")
    return Source(spec, "hub", subset=subset, split=split)


def _package_source(spec: str) -> Source:
    module = spec.removeprefix("package:").strip()
    try:
        found = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        raise TunebookError(f"{spec}: no installed Python package named '{module}'\n"
                            f"    fix: pip install the package that provides it (e.g. `pip install {dist}`)")
    root = Path(list(found.submodule_search_locations)[0])
    files = _data_files(root)
    if not files:
        raise TunebookError(f"{spec}: package '{module}' has no {', '.join(EXTENSIONS)} data files in {root}\n"
                            "    fix: point data.source at the data file itself")
    return Source(spec, "files", files, display_root=root.parent)


def read_file(path: Path, name: str, bad: BadRecords) -> tuple[list[Record], str | None]:
    """All records of one file, and a truncation notice if it was cut off. A file that cannot be read at
    all (empty, another encoding, not Parquet) goes to `bad` like a bad record."""
    suffix = path.suffix.lower()
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        bad.add(name, f"cannot be read ({exc.strerror})", "check the file's permissions, or remove it")
        return [], None
    if suffix != ".parquet":
        encoding = foreign_encoding(head)
        if encoding:
            bad.add(name, f"the file is {encoding} text, not UTF-8", reencode_fix(encoding))
            return [], None
        if not head.removeprefix(BOM).strip() and _blank(path):
            bad.add(name, "the file is empty (or only blank lines)", "remove the file, or put records in it")
            return [], None
    if suffix == ".jsonl":
        return list(read_jsonl(path, name, bad)), None
    if suffix == ".json":
        if head.removeprefix(BOM).lstrip().startswith(b"["):
            return read_json_array(path, name, bad)
        return list(read_jsonl(path, name, bad)), None  # JSON Lines saved with a .json name
    if suffix == ".parquet":
        return read_parquet(path, name, bad), None
    if suffix == ".csv":
        return read_csv(path, name, bad), None
    raise TunebookError(f"{name}: unsupported data file type '{path.suffix}'\n    fix: use one of {', '.join(EXTENSIONS)}")


def _blank(path: Path) -> bool:
    """Whether a file holds nothing but white space (read in chunks, never whole)."""
    with path.open("rb") as f:
        first = True
        while chunk := f.read(CHUNK_CHARS):
            if (chunk.removeprefix(BOM) if first else chunk).strip():
                return False
            first = False
    return True


def _lines(f) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of a binary file; None for a line over MAX_LINE_BYTES (read past, never held)."""
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(CHUNK_CHARS)
            yield lineno, None
            continue
        yield lineno, raw


def _decode_line(raw: bytes, lineno: int) -> tuple[str | None, str]:
    """(text, '') or (None, why not): UTF-8, a byte-order mark on the first line dropped."""
    if lineno == 1:
        raw = raw.removeprefix(BOM)
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"


def read_jsonl(path: Path, name: str, bad: BadRecords) -> Iterator[Record]:
    """One JSON object per line; blank lines are allowed, line ends may be LF or CRLF."""
    with path.open("rb") as f:
        for lineno, raw in _lines(f):
            where = f"{name}:{lineno}"
            if raw is None:
                bad.add(where, f"the line is longer than {MAX_LINE_BYTES // 2**20} MiB",
                        "split that record, or check that the file really is JSON Lines (one record per line)")
                continue
            line, why = _decode_line(raw, lineno)
            if line is None:
                bad.add(where, why, "save the file as UTF-8, or " + RECORD_FIX.split(", or ")[-1])
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.add(where, f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})")
                continue
            except RecursionError:
                bad.add(where, "not usable JSON (nested too deep to read)")
                continue
            except ValueError:  # Python's own bound on the digits of a number
                bad.add(where, "not usable JSON (a number of thousands of digits)")
                continue
            if not isinstance(row, dict):
                bad.add(where, f"not a JSON object (it is {describe(row)})")
                continue
            yield Record(row, where)


def read_parquet(path: Path, name: str, bad: BadRecords) -> list[Record]:
    """Every row of a Parquet file; a file pyarrow cannot read goes to `bad`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        bad.add(name, f"not a readable Parquet file ({str(exc).splitlines()[0][:200]})",
                "write the file again, or remove it")
        return []
    return [Record(row, f"{name} row {i}") for i, row in enumerate(rows)]


csv.field_size_limit(MAX_LINE_BYTES)


def read_csv(path: Path, name: str, bad: BadRecords) -> list[Record]:
    """Rows of a CSV file with a header line; a row whose width differs from the header's goes to `bad`."""
    raw = path.read_bytes().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        bad.add(f"{name}:{line}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", "save the file as UTF-8")
        return []
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[Record] = []
    header: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return records
        except csv.Error as exc:
            bad.add(f"{name}:{reader.line_num}", f"not valid CSV ({exc})")
            continue
        if header is None:
            header = row
            if len(set(header)) != len(header):
                twice = sorted({h for h in header if header.count(h) > 1})
                raise TunebookError(f"{name}:1: the header names column(s) {', '.join(map(repr, twice))} twice\n"
                                    "    fix: give every column its own name")
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            bad.add(f"{name}:{reader.line_num}", f"has {len(row)} fields, the header has {len(header)} (a comma "
                    "or quote out of place?)")
            continue
        records.append(Record(dict(zip(header, row)), f"{name}:{reader.line_num}"))


def _cut_off(exc: json.JSONDecodeError, buf: str) -> bool:
    """Whether a parse error at end of file means the file stops mid-record (not a bad record)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(buf.rstrip()) - 16


def read_json_array(path: Path, name: str, bad: BadRecords) -> tuple[list[Record], str | None]:
    """Stream a top-level JSON array record by record, keeping every complete record of a cut-off file."""
    reader = _ArrayReader(path, name)
    records: list[Record] = []
    complete = 0
    if reader.next_char() != "[":
        raise TunebookError(f"{name}: expected a JSON array ('[' first)")
    reader.pos += 1
    while True:
        ch = reader.next_char()
        if ch == "":
            return records, _notice(name, complete, reader.line, "without its closing ']'")
        if ch == "]":
            return records, None
        if complete:
            if ch != ",":
                raise TunebookError(f"{name}:{reader.line}: expected ',' or ']' after record {complete}")
            reader.pos += 1
            if reader.next_char() == "":
                return records, _notice(name, complete, reader.line, "after a ','")
        line = reader.line
        try:
            value = reader.decode()
        except RecursionError:
            if not reader.skip_value():
                return records, _notice(name, complete, line, "inside a record")
            complete += 1
            bad.add(f"{name}:{line}", "not usable JSON (nested too deep to read)")
            continue
        except json.JSONDecodeError as exc:
            if not _cut_off(exc, reader.buf):
                raise TunebookError(f"{name}:{reader.line_at(exc.pos)}: not valid JSON ({exc.msg}) in record "
                                    f"{complete + 1}\n    fix: repair the file") from None
            return records, _notice(name, complete, line, "inside a record")
        complete += 1
        if isinstance(value, dict):
            records.append(Record(value, f"{name}:{line}"))
        else:
            bad.add(f"{name}:{line}", f"record is not a JSON object (it is {describe(value)})")


def _notice(name: str, complete: int, line: int, how: str) -> str:
    return (f"{name} is cut off {how} at line {line:,}: kept the {complete:,} complete records "
            f"(truncated after record {complete})")


class _ArrayReader:
    """A growing text window over a file, with the line number of the read position."""

    def __init__(self, path: Path, name: str) -> None:
        self.file, self.name = path.open("rb"), name
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()  # a byte-order mark is dropped
        self.buf, self.pos, self.eof = "", 0, False
        self._line, self._line_pos = 1, 0
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.file.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            self.file.close()
            return False
        self._count_lines()  # up to pos, before the consumed text is dropped
        try:
            text = self.utf8.decode(chunk)
        except UnicodeDecodeError:
            raise TunebookError(f"{self.name}:{self._line}: not UTF-8 text (near this line)\n"
                                "    fix: save the file as UTF-8") from None
        self.buf = self.buf[self.pos:] + text
        self._line_pos -= self.pos
        self.pos = 0
        return True

    def _count_lines(self) -> None:
        self._line += self.buf.count("\n", self._line_pos, self.pos)
        self._line_pos = self.pos

    @property
    def line(self) -> int:
        """1-based line number of the read position."""
        self._count_lines()
        return self._line

    def line_at(self, pos: int) -> int:
        return self.line + self.buf.count("\n", self.pos, pos)

    def next_char(self) -> str:
        """The next non-space character ('' at end of file), leaving pos on it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def decode(self) -> Any:
        while True:
            try:
                value, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return value
            except json.JSONDecodeError:
                if not self._more():
                    raise

    def skip_value(self) -> bool:
        """Move past the array or object at pos without parsing it (it nests too deep for the JSON reader);
        False if the file ends inside it."""
        depth, in_string, escaped, i = 0, False, False, self.pos
        while True:
            if i >= len(self.buf):
                start = self.pos
                if not self._more():
                    return False
                i -= start  # _more() dropped the text before pos
                continue
            ch = self.buf[i]
            i += 1
            if in_string:
                escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    self.pos = i
                    return True
