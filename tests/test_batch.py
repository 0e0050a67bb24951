"""Batch: row operations keep fields aligned, padding is tracked, serialization is raw-buffer and private."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from raylane.batch import Batch


def make_batch(rows: int = 10) -> Batch:
    return Batch(
        {"ids": torch.arange(rows * 3).reshape(rows, 3), "mask": torch.arange(rows) % 2 == 0},
        {"prompt": [f"p{i}" for i in range(rows)], "tags": [[i, i + 1] for i in range(rows)]},
        {"version": 7},
    )


def assert_same(a: Batch, b: Batch) -> None:
    assert a.keys() == b.keys()
    for name in a.tensors:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name]), name
    for name in a.non_tensors:
        assert list(a[name]) == list(b[name]), name
    assert a.meta == b.meta


def test_fields_and_validation():
    batch = make_batch()
    assert len(batch) == 10
    assert batch.keys() == ["ids", "mask", "prompt", "tags"]
    assert "prompt" in batch and "nope" not in batch
    # a list of equal-length lists stays one object per row
    assert batch["tags"].shape == (10,) and batch["tags"][3] == [3, 4]
    with pytest.raises(ValueError, match="different numbers of rows"):
        Batch({"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="0-d"):
        Batch({"a": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="meta"):
        Batch(non_tensors={"temperature": 0.7})
    with pytest.raises(KeyError, match="fields"):
        batch["nope"]
    batch["score"] = torch.ones(10)
    assert batch["score"].shape == (10,)
    with pytest.raises(ValueError, match="different numbers of rows"):
        batch["bad"] = torch.ones(3)
    assert "bad" not in batch


def test_from_dict_select_union():
    batch = Batch.from_dict({"x": torch.arange(4), "text": ["a", "b", "c", "d"]}, meta={"step": 1})
    assert list(batch.tensors) == ["x"] and list(batch.non_tensors) == ["text"]
    only_x = batch.select("x")
    assert only_x.keys() == ["x"] and only_x.meta == {"step": 1}
    with pytest.raises(KeyError, match="no fields"):
        batch.select("y")
    merged = batch.union(Batch({"y": torch.arange(4) * 2, "x": torch.arange(4)}, meta={"extra": True}))
    assert merged.keys() == ["x", "y", "text"] and merged.meta == {"step": 1, "extra": True}
    with pytest.raises(ValueError, match="different values"):
        batch.union(Batch({"x": torch.zeros(4, dtype=torch.long)}))


def test_indexing():
    batch = make_batch()
    assert torch.equal(batch[2:5]["ids"], batch["ids"][2:5])
    one = batch[-1]
    assert len(one) == 1 and one["prompt"][0] == "p9"
    picked = batch[[7, 1, -2]]
    assert torch.equal(picked["ids"][:, 0], torch.tensor([21, 3, 24]))
    assert list(picked["prompt"]) == ["p7", "p1", "p8"]
    masked = batch[batch["mask"]]
    assert list(masked["prompt"]) == ["p0", "p2", "p4", "p6", "p8"]
    assert len(batch[[]]) == 0 and batch[[]].keys() == batch.keys()
    with pytest.raises(IndexError, match="out of range"):
        batch[[0, 10]]
    with pytest.raises(IndexError, match="mask"):
        batch[torch.ones(3, dtype=torch.bool)]


def test_split_chunk_concat_roundtrip():
    batch = make_batch()
    parts = batch.split(4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert_same(Batch.concat(parts), batch)
    halves = batch.chunk(2)
    assert [len(h) for h in halves] == [5, 5]
    with pytest.raises(ValueError, match=r"pad_to_divisor\(4\)"):
        batch.chunk(4)
    with pytest.raises(ValueError, match="fields"):
        Batch.concat([batch, batch.select("ids")])


def test_pad_chunk_concat_unpad():
    batch = make_batch(10)
    padded = batch.pad_to_divisor(4)
    assert len(padded) == 12 and padded.num_padding == 2
    # padding rows are copies of the first rows, so they are valid inputs
    assert torch.equal(padded["ids"][10:], batch["ids"][:2])
    assert list(padded["prompt"][10:]) == ["p0", "p1"]
    chunks = padded.chunk(4)
    assert [c.num_padding for c in chunks] == [0, 0, 0, 2]
    assert [c.num_padding for c in padded.split(5)] == [0, 0, 2]
    rejoined = Batch.concat(chunks)
    assert rejoined.num_padding == 2
    assert_same(rejoined.unpad(), batch)
    assert batch.pad_to_divisor(5).num_padding == 0
    with pytest.raises(ValueError, match="padding rows"):
        Batch.concat([chunks[3], chunks[0]])
    assert len(Batch({"x": torch.zeros(0)}).pad_to_divisor(3)) == 0


def test_pickle_uses_raw_buffers_and_keeps_dtypes():
    batch = Batch(
        {
            "bf16": torch.randn(6, 4).to(torch.bfloat16),
            "flag": torch.tensor([True, False] * 3),
            "strided": torch.arange(24).reshape(4, 6).t(),
        },
        {"text": list("abcdef")},
        {"v": 1},
        num_padding=1,
    )
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    # every tensor byte goes out-of-band (Ray writes those straight into shared memory)
    assert sum(memoryview(b).nbytes for b in buffers) == batch.nbytes
    restored = pickle.loads(data, buffers=buffers)
    assert_same(restored, batch)
    assert restored.num_padding == 1


def test_object_store_roundtrip_gives_private_tensors(ray_cluster):
    ray = ray_cluster
    batch = make_batch(8)
    ref = ray.put(batch)

    @ray.remote(num_cpus=0.25)
    def mutate(b: Batch) -> int:
        b["ids"].add_(1000)  # must not leak into the stored object
        return int(b["ids"].sum())

    first = ray.get(ref)
    assert_same(first, batch)
    assert ray.get(mutate.remote(ref)) == int(batch["ids"].sum()) + 1000 * batch["ids"].numel()
    assert_same(ray.get(ref), batch)
    first["ids"].zero_()  # writable locally too
    assert_same(ray.get(ref), batch)


def test_non_tensor_numpy_columns():
    batch = Batch(non_tensors={"score": np.arange(4.0), "obj": ["a", None, 3, {"k": 1}]})
    assert len(batch) == 4
    assert batch[1:3]["obj"].tolist() == [None, 3]
    assert batch.pad_to_divisor(3)["score"].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 1.0]
