"""TensorBoard and Weights & Biases loggers: a job that turns them on finds every metric of
metrics.jsonl, under the same name and step, in the TensorBoard event files and in the offline
W&B run, read back from their files."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import pytest
from tensorboardX.proto import event_pb2
from wandb.proto import wandb_internal_pb2

from raylane.controllers import LoggersConfig, RLJob, make_loggers
from tests.test_rl_job import _config, _read_metrics


def _tfrecords(path: str) -> list[bytes]:
    """The records of a TFRecord file: length (u64), its CRC, data, the data's CRC."""
    records = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            records.append(f.read(length))
            f.read(4)
    return records


def tensorboard_scalars(log_dir: str) -> dict[tuple[int, str], float]:
    """``{(step, tag): value}`` of every scalar in the event files under ``log_dir``."""
    scalars = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for record in _tfrecords(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars[(event.step, value.tag)] = value.simple_value
    return scalars


# W&B's run file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks, each
# with a 7-byte header (CRC, little-endian length, type); a record too long for a block is split.
_WANDB_BLOCK, _CHUNK_HEADER = 32 * 1024, 7
_FULL, _FIRST, _LAST = 1, 2, 4


def _wandb_records(path: str) -> list[wandb_internal_pb2.Record]:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, position = [], b"", _CHUNK_HEADER
    while position + _CHUNK_HEADER <= len(data):
        room = _WANDB_BLOCK - position % _WANDB_BLOCK
        if room < _CHUNK_HEADER:
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + _CHUNK_HEADER])
        chunk = data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_history(run_dir: str) -> tuple[dict[tuple[int, str], float], dict]:
    """``({(step, key): value}, run config)`` of the offline run in ``run_dir``."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    history, config = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            step = record.history.step.num
            history.update({(step, key): value for key, value in items.items() if not key.startswith("_")})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return history, config


def test_job_logs_every_metric_to_tensorboard_and_wandb_under_its_name(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(tmp_path, "logged", loggers={"tensorboard": True, "wandb": True})
    RLJob(config).run()
    logged = {
        (row["step"], key): value
        for row in _read_metrics(config)
        for key, value in row.items()
        if key != "step"
    }
    assert (2, "actor/pg_loss") in logged and (0, "eval_reward_mean") in logged

    scalars = tensorboard_scalars(os.path.join(config.output_dir, "tensorboard"))
    assert scalars == pytest.approx(logged, rel=1e-6)  # event files hold float32

    (run_dir,) = glob.glob(os.path.join(config.output_dir, "wandb", "offline-run-*"))
    history, run_config = wandb_history(run_dir)
    assert history == pytest.approx(logged)
    assert run_config["steps"] == 2 and run_config["loggers"]["wandb"] is True


def test_a_logger_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(
        ImportError, match=r"loggers.tensorboard=true needs the tensorboardX package: pip install"
    ):
        make_loggers(LoggersConfig(tensorboard=True), str(tmp_path), "job", {})
