"""Read an offline W&B run file (``run-*.wandb``): a LevelDB-format log of protobuf ``Record``s."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic 0xBEE1 + version


def records(path: str | Path, wait: float = 60.0) -> list:
    """Every record of the run file. W&B's writer buffers the file and may still be flushing it
    when ``wandb.finish()`` returns: until the run's ``exit`` record is on disk the file is read
    again, for at most ``wait`` seconds (then what is there is returned)."""
    deadline = time.monotonic() + wait
    while True:
        out = _read(path)
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.25)


def _read(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data:
        return []
    assert data[:4] == b":W&B", "not a W&B run file"
    out, pos, buf = [], HEADER, b""
    while pos + 7 <= len(data):
        block_left = BLOCK - (pos % BLOCK)
        if block_left < 7:
            pos += block_left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + 7])
        if rtype == 0 and length == 0:
            pos += block_left  # zero padding until the end of the block
            continue
        if pos + 7 + length > len(data):
            break  # a record still being written
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if rtype == 1:
            buf = chunk
        elif rtype == 2:
            buf = chunk
            continue
        elif rtype == 3:
            buf += chunk
            continue
        elif rtype == 4:
            buf += chunk
        rec = pb.Record()
        rec.ParseFromString(buf)
        out.append(rec)
        buf = b""
    return out


def history(path: str | Path, wait: float = 60.0) -> list[dict]:
    """Every ``history`` row as a dict of decoded JSON values (see :func:`records` for ``wait``)."""
    rows = []
    for rec in records(path, wait):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
