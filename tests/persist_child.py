"""A training process for the checkpoint crash tests, run as ``python -m tests.persist_child``.

``train ROOT STEPS``: a real gloo world of one rank trains a model big enough that persisting its
checkpoint takes a while, checkpoints each step in the background through a ``CheckpointStore``
(two writer threads, so its shards span two files; poll, commit when persisted, as the RL job does), and prints ``snapshot N`` once step N's state is
in host memory and ``committed N`` once it is complete on disk, so the parent can SIGKILL it at
either point. Before each save it also writes the step's weights and first moments with a plain
``torch.save`` (``ROOT.reference/step_N.pt``). ``lazy ROOT STEPS``: the same steps checkpointed as
``checkpoint_mode=lazy`` does, a :class:`BackgroundSaver` with ``lazy`` into a memory tier (``ROOT.memory``) whose snapshot
overlaps the next step, committed before that step's save, then copied to ROOT by a
:class:`DiskPersister`; it prints ``memory N`` once step N is committed to the memory tier.
``slots ROOT``: lazy saves into the memory tier only, an older checkpoint removed as the persister
prunes, another kept; prints the inodes of the checkpoints' shard files and of the host buffers'.
``check ROOT``: loads the newest complete checkpoint (of both tiers) and prints, as JSON, its step and
whether its tensors are bit for bit the ones training held at that step.
The reference is what training held, not a recomputation: a CPU GEMM need not give the same bits in
two processes, and a check that retrains would fail on that rather than on the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

from raylane.fault_tolerance import (
    HOST_BUFFERS_DIR,
    BackgroundSaver,
    CheckpointStore,
    DiskPersister,
    load_train_state,
    newest_checkpoint,
)

# 8 layers of 1024 x 1024 with AdamW's two moments: about 100 MB to persist per checkpoint.
LAYERS, WIDTH = 8, 1024
# RAYLANE_TEST_DEVICE=cuda trains on the GPU (by hand on a GPU machine: the tests run it on CPU).
DEVICE = os.environ.get("RAYLANE_TEST_DEVICE", "cpu")


def train_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A learning rate that changes every step: checkpoints must hold their own step's.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def backward(model, step: int) -> None:
    inputs = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(step)).to(DEVICE)
    model(inputs).square().mean().backward()


def update(optimizer, scheduler) -> None:
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def train_step(model, optimizer, scheduler, step: int) -> None:
    backward(model, step)
    update(optimizer, scheduler)


def _reference_path(root: str, step: int) -> str:
    # The memory tier ``ROOT.memory`` shares the disk tier's references.
    return os.path.join(f"{root.removesuffix('.memory')}.reference", f"step_{step}.pt")


def _tensors(model, optimizer) -> dict[str, list[torch.Tensor]]:
    params = list(model.parameters())
    return {
        "weights": [p.detach().cpu() for p in params],
        "moments": [optimizer.state[p]["exp_avg"].cpu() for p in params],
        "lr": [torch.tensor(group["lr"]) for group in optimizer.param_groups],
    }


def _init_world() -> None:
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def _save(saver, store, model, optimizer, scheduler, step: int, **options) -> None:
    saver.save(
        store.staging(step), model, optimizer, scheduler, step, rank=0, extra={"step": step}, **options
    )


def _host_dir(memory) -> str:
    return os.path.join(memory.root, HOST_BUFFERS_DIR)


def train(root: str, steps: int) -> None:
    _init_world()
    model, optimizer, scheduler = train_objects()
    store, saver = CheckpointStore(root), BackgroundSaver()
    for step in range(1, steps + 1):
        train_step(model, optimizer, scheduler, step)
        _save_reference(root, model, optimizer, step)
        _save(saver, store, model, optimizer, scheduler, step, writer_threads=2)
        print(f"snapshot {step}", flush=True)
        saver.wait()
        store.commit(step)
        print(f"committed {step}", flush=True)


def _save_reference(root: str, model, optimizer, step: int) -> None:
    os.makedirs(os.path.dirname(_reference_path(root, step)), exist_ok=True)
    torch.save(_tensors(model, optimizer), _reference_path(root, step))


def lazy(root: str, steps: int) -> None:
    _init_world()
    model, optimizer, scheduler = train_objects()
    memory, saver = CheckpointStore(f"{root}.memory"), BackgroundSaver(lazy=True)
    persister = DiskPersister(memory, CheckpointStore(root), threads=2)
    backward(model, 1)
    for step in range(1, steps + 1):
        # Step's gradients were computed before the previous save: its optimizer step comes right
        # after that save, while the snapshot is being copied, and must wait for it.
        update(optimizer, scheduler)
        if step > 1:
            saver.wait()
            memory.commit(step - 1)
            persister.offer(step - 1)
            print(f"memory {step - 1}", flush=True)
        _save_reference(root, model, optimizer, step)
        if step < steps:
            backward(model, step + 1)
        _save(saver, memory, model, optimizer, scheduler, step, host_dir=_host_dir(memory))
    saver.wait()
    memory.commit(steps)
    persister.offer(steps)
    print(f"memory {steps}", flush=True)
    persister.drain()
    print("drained", flush=True)


def slots(root: str) -> None:
    """Lazy saves into a memory tier whose older checkpoints are removed or kept as the test of the host
    buffers needs; prints, as JSON, the inode of each checkpoint's shard file and of each slot's."""
    _init_world()
    model, optimizer, scheduler = train_objects()
    memory, saver = CheckpointStore(f"{root}.memory"), BackgroundSaver(lazy=True)
    host_dir, shards = _host_dir(memory), {}
    for step in range(1, 5):
        train_step(model, optimizer, scheduler, step)
        _save_reference(root, model, optimizer, step)
        _save(saver, memory, model, optimizer, scheduler, step, host_dir=host_dir)
        saver.wait()
        shards[step] = os.stat(os.path.join(memory.commit(step), "dcp", "__0_0.distcp")).st_ino
        if step == 2:
            # As the disk persister prunes: step 1's checkpoint goes, step 2's stays (being copied).
            shutil.rmtree(memory.path(1))
    slot_files = sorted(
        (os.path.relpath(folder, host_dir), os.stat(os.path.join(folder, "__0_0.distcp")).st_ino)
        for folder, _, names in os.walk(host_dir)
        if "__0_0.distcp" in names
    )
    print(json.dumps({"shards": shards, "slots": slot_files}))


def _compare(path: str) -> dict:
    """Load the checkpoint ``path``; its step and whether its tensors are the ones training held then."""
    model, optimizer, scheduler = train_objects()
    step, _ = load_train_state(path, model, optimizer, scheduler, rank=0)
    loaded, held = _tensors(model, optimizer), torch.load(_reference_path(os.path.dirname(path), step))
    same = {
        f"same_{kind}": all(torch.equal(a, b) for a, b in zip(loaded[kind], held[kind], strict=True))
        for kind in ("weights", "moments", "lr")
    }
    return {"step": step, **same}


def check(root: str, which: str = "newest") -> None:
    """``newest``: the newest complete checkpoint of both tiers; ``all``: every one, oldest first."""
    _init_world()
    stores = [CheckpointStore(root), CheckpointStore(f"{root}.memory")]
    if which == "newest":
        print(json.dumps(_compare(newest_checkpoint(*stores))))
    else:
        paths = sorted((step, store.path(step)) for store in stores for step in store.complete_steps())
        print(json.dumps([_compare(path) for _, path in paths]))


if __name__ == "__main__":
    command, root, *rest = sys.argv[1:]
    if command == "train":
        train(root, int(rest[0]))
    elif command == "lazy":
        lazy(root, int(rest[0]))
    elif command == "slots":
        slots(root)
    else:
        check(root, *rest)
