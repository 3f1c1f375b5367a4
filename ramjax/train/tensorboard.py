"""TensorBoard scalar logs without TensorFlow, tensorboardX or a protobuf library.

Scalars are all the training loop logs, and their file format is small: a TFRecord file (each record framed as
a little-endian uint64 length, the masked CRC32C of those 8 bytes, the data, the masked CRC32C of the data) of
`Event` protobuf messages, which are encoded here by hand:
    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
Each file starts with an Event holding only wall_time and file_version "brain.Event:2".

A writer opens its file lazily, on its first scalar, in append mode, and writes whole records with one write()
each flush, so a resumed run (which writes a new file in the same directory; TensorBoard merges the files of a
directory) never clobbers or tears what an earlier writer left. `read_scalars` parses a directory back, checking
every CRC, for tests and for anyone without TensorBoard.
"""

from __future__ import annotations

import math
import operator
import os
import socket
import struct
import threading
import time
from collections.abc import Mapping
from typing import Self

FILE_VERSION = "brain.Event:2"
_FLOAT32_MAX = 3.4028234663852886e38


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses; crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masking of the CRC (so that CRCs of data that holds CRCs stay well distributed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# --- protobuf wire format, the few pieces an Event needs ---


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64: negative numbers are their 64-bit two's complement, 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite but beyond float32: round to infinity, as a float32 cast does
        return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, *, step: int | None = None, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:  # proto3 leaves a zero out (readers default it), and so does this, byte for byte
        out += _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if summary is not None:
        out += _length_delimited(5, summary)
    return out


def _summary(values: Mapping[str, float]) -> bytes:
    out = b""
    for tag, value in values.items():
        entry = _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + _float32(value)
        out += _length_delimited(1, entry)
    return out


class SummaryWriter:
    """Writes scalars to `logdir/events.out.tfevents.<int time>.<hostname>`, readable by TensorBoard.

    Records are kept in memory until flush() (or close(), or the first scalar more than `flush_secs` after the
    last flush), then appended with one write. Usable as a context manager, which closes it.
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 120.0):
        self.logdir = os.fspath(logdir)
        self.flush_secs = flush_secs
        self.path: str | None = None  # the event file, once the first scalar has opened it
        self._file = None
        self._pending: list[bytes] = []
        self._last_flush = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Logs one value of the series `tag` at training step `step`."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Logs several series at one step, as one Event."""
        checked = {}
        for tag, value in values.items():
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"tag: must be a non-empty string, got {tag!r}")
            try:
                checked[tag] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"value: for tag {tag!r} must be a real number, got {value!r}") from None
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"step: must be an integer, got {step!r}") from None
        if not -(1 << 63) <= step < (1 << 63):
            raise ValueError(f"step: must fit in int64, got {step}")
        record = _record(_event(time.time(), step=step, summary=_summary(checked)))
        with self._lock:
            self._check_open()
            if self._file is None:
                self._open()
            self._pending.append(record)
            if time.monotonic() - self._last_flush >= self.flush_secs:
                self._flush()

    def flush(self) -> None:
        """Writes every pending record to the file (which the OS may still buffer, but no longer this process)."""
        with self._lock:
            self._check_open()
            self._flush()

    def close(self) -> None:
        """Flushes and closes the file; closing twice is harmless, logging after close is an error."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush()
            finally:
                self._closed = True
                if self._file is not None:
                    self._file.close()
                    self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"SummaryWriter: closed; open a new one to log to {self.logdir!r}")

    def _open(self) -> None:
        os.makedirs(self.logdir, exist_ok=True)
        now = time.time()
        self.path = os.path.join(self.logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
        # Append, unbuffered: should a writer of the same second and host have made this file, its records stay.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (open until close())
        self._pending.append(_record(_event(now, file_version=FILE_VERSION)))

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        while data:  # one write() unless the OS takes less
            data = data[self._file.write(data):]


# --- reading ---


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("varint runs past the end of its message")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) for each field: ints for varints, bytes for the rest."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        if pos > len(data):
            raise ValueError(f"field {field} runs past the end of its message")
        yield field, wire, value


def _scalars_of_event(data: bytes):
    step, summaries = 0, []
    for field, wire, value in _fields(data):
        if field == 2 and wire == 0:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 5 and wire == 2:
            summaries.append(value)
    for summary in summaries:
        for field, wire, value in _fields(summary):
            if field != 1 or wire != 2:
                continue
            tag, simple_value = None, None
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    tag = v.decode()
                elif f == 2 and w == 5:
                    simple_value = struct.unpack("<f", v)[0]
            if tag is not None and simple_value is not None:
                yield tag, step, simple_value


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    pos, index = 0, 0
    while pos < len(data):
        # A record cut short at the end of the file is one still being written (or lost to a crash): stop there,
        # as TensorBoard does. Everything else that fails a check is corruption.
        if len(data) - pos < 12:
            return
        header = data[pos : pos + 8]
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc32c(header):
            raise ValueError(f"{path}: record {index} at byte {pos}: length CRC mismatch (corrupt file)")
        length = struct.unpack("<Q", header)[0]
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            return
        payload = data[start:end]
        if struct.unpack("<I", data[end : end + 4])[0] != masked_crc32c(payload):
            raise ValueError(f"{path}: record {index} at byte {pos}: data CRC mismatch (corrupt file)")
        yield payload
        pos, index = end + 4, index + 1


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every simple_value scalar in the event files of `logdir` (not its subdirectories): tag -> [(step, value)].

    Files are read in name order (their names start with the creation time, so a resumed run's file comes after
    the run it resumed), records in file order; a step logged again after a resume appears twice. Raises
    ValueError naming the file on a record whose CRC does not match.
    """
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise FileNotFoundError(f"logdir: {logdir!r} is not a directory")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        for index, payload in enumerate(_records(path)):
            try:
                for tag, step, value in _scalars_of_event(payload):
                    scalars.setdefault(tag, []).append((step, value))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: record {index}: not a valid Event message: {e}") from None
    return scalars
