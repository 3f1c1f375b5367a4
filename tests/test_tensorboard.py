"""The dependency-free TensorBoard writer: TFRecord framing, the Event encoding, resumes, and corruption."""

import math
import os
import struct

import pytest

from ramjax.train import tensorboard
from ramjax.train.tensorboard import SummaryWriter, crc32c, masked_crc32c, read_scalars


def _event_files(logdir):
    return sorted(p for p in logdir.iterdir() if p.name.startswith("events.out.tfevents."))


def test_crc32c_known_answers():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_round_trip_of_several_tags_and_steps(tmp_path):
    expected = {"loss": [], "accuracy": [], "lr/schedule": []}
    with SummaryWriter(tmp_path / "run") as writer:
        for step in range(0, 50, 5):
            loss, acc = 1.0 / (step + 1), step / 50
            writer.scalar("loss", loss, step)
            writer.scalars({"accuracy": acc, "lr/schedule": 3e-4}, step)
            expected["loss"].append((step, struct.unpack("<f", struct.pack("<f", loss))[0]))
            expected["accuracy"].append((step, struct.unpack("<f", struct.pack("<f", acc))[0]))
            expected["lr/schedule"].append((step, struct.unpack("<f", struct.pack("<f", 3e-4))[0]))
        writer.scalar("big_step", -1.5, 2**40)
        writer.scalar("negative_step", 2.0, -3)
        writer.scalar("overflow", 1e300, 0)
    (path,) = _event_files(tmp_path / "run")
    assert path.name.split(".")[3].isdigit() and writer.path == str(path)
    scalars = read_scalars(tmp_path / "run")
    for tag, series in expected.items():
        assert scalars[tag] == series
    assert scalars["big_step"] == [(2**40, -1.5)] and scalars["negative_step"] == [(-3, 2.0)]
    assert scalars["overflow"] == [(0, math.inf)]


def test_first_record_is_the_file_version_and_framing_is_tfrecord(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        writer.scalar("x", 1.0, 7)
    data = _event_files(tmp_path)[0].read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert struct.unpack("<I", data[8:12])[0] == masked_crc32c(data[:8])
    first = data[12 : 12 + length]
    assert struct.unpack("<I", data[12 + length : 16 + length])[0] == masked_crc32c(first)
    # wall_time (field 1, double), then file_version (field 3, string).
    assert first[0] == 0x09 and abs(struct.unpack("<d", first[1:9])[0] - os.path.getmtime(writer.path)) < 60
    assert first[9:] == b"\x1a\x0dbrain.Event:2"
    second = data[16 + length + 12 : -4]
    assert second[9:11] == b"\x10\x07"  # step (field 2, varint) = 7
    assert second[11] == 0x2A  # summary (field 5, message)


def test_nothing_is_written_until_flush_and_no_file_without_scalars(tmp_path):
    SummaryWriter(tmp_path / "empty").close()
    assert not (tmp_path / "empty").exists()
    writer = SummaryWriter(tmp_path)
    writer.scalar("a", 1.0, 0)
    assert read_scalars(tmp_path) == {}
    writer.flush()
    assert read_scalars(tmp_path) == {"a": [(0, 1.0)]}
    writer.scalar("a", 2.0, 1)
    writer.close()
    writer.close()
    assert read_scalars(tmp_path) == {"a": [(0, 1.0), (1, 2.0)]}
    with pytest.raises(ValueError, match="closed"):
        writer.scalar("a", 3.0, 2)


def test_resumed_run_writes_a_second_file_and_both_are_read(tmp_path, monkeypatch):
    clock = iter([1_700_000_000.5 + i for i in range(1000)])
    monkeypatch.setattr(tensorboard.time, "time", lambda: next(clock))
    with SummaryWriter(tmp_path) as first:
        for step in range(3):
            first.scalar("loss", float(step), step)
    with SummaryWriter(tmp_path) as second:
        for step in range(3, 6):
            second.scalar("loss", float(step), step)
    assert len(_event_files(tmp_path)) == 2 and first.path != second.path
    assert read_scalars(tmp_path) == {"loss": [(s, float(s)) for s in range(6)]}


def test_a_writer_of_the_same_second_appends(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard.time, "time", lambda: 1_700_000_000.0)
    for step in range(3):
        with SummaryWriter(tmp_path) as writer:
            writer.scalar("loss", float(step), step)
    assert len(_event_files(tmp_path)) == 1
    assert read_scalars(tmp_path) == {"loss": [(0, 0.0), (1, 1.0), (2, 2.0)]}


def test_corrupt_byte_is_detected_and_names_the_file(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        for step in range(4):
            writer.scalar("loss", 0.5, step)
    path = _event_files(tmp_path)[0]
    good = path.read_bytes()
    for offset in (3, 10, len(good) // 2, len(good) - 1):  # length, length CRC, some data, the last data CRC
        bad = bytearray(good)
        bad[offset] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=f"{path.name}.*CRC mismatch"):
            read_scalars(tmp_path)


def test_a_truncated_last_record_is_left_out_like_tensorboard_does(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        for step in range(3):
            writer.scalar("loss", 0.5, step)
    path = _event_files(tmp_path)[0]
    path.write_bytes(path.read_bytes()[:-5])
    assert read_scalars(tmp_path) == {"loss": [(0, 0.5), (1, 0.5)]}


def test_bad_arguments_name_the_field(tmp_path):
    writer = SummaryWriter(tmp_path)
    with pytest.raises(ValueError, match="tag: must be a non-empty string"):
        writer.scalar("", 1.0, 0)
    with pytest.raises(ValueError, match="value: for tag 'x' must be a real number"):
        writer.scalar("x", "nan-ish", 0)
    with pytest.raises(ValueError, match="step: must be an integer"):
        writer.scalar("x", 1.0, 1.5)
    with pytest.raises(ValueError, match="step: must fit in int64"):
        writer.scalar("x", 1.0, 2**63)
    with pytest.raises(FileNotFoundError, match="logdir"):
        read_scalars(tmp_path / "missing")


def test_tensorboard_itself_reads_the_files(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with SummaryWriter(tmp_path) as writer:
        writer.scalar("loss", 0.25, 1)
    with SummaryWriter(tmp_path) as writer:  # a resume, possibly in the same second
        writer.scalar("loss", 0.125, 2)
        writer.scalar("acc", 0.5, 2)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"loss", "acc"}
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(1, 0.25), (2, 0.125)]
    assert [(e.step, e.value) for e in accumulator.Scalars("acc")] == [(2, 0.5)]
