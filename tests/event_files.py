"""Reading TensorBoard event files back in tests: TFRecord frames (length, its CRC, the record, its CRC) holding
`Event` protos, parsed with the proto classes tensorboardX ships."""

import os
import struct

from tensorboardX.proto import event_pb2


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file in `logdir`, in file order (sessions in time order)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        position = 0
        while position + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            record = data[position + 12:position + 12 + length]
            position += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
