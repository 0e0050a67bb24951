"""What slows a GPU step while a lazy checkpoint is written: the step's loop (launch-bound small
kernels with a host sync every few, as in decode, then large matmuls, as in training) timed alone and
with one background activity at a time: the device-to-host copy of the state into pinned buffers on
a side stream, a thread writing those buffers to tmpfs with ``torch.save`` or with DCP, and another
process copying a file of the same size from tmpfs to disk.

    python benchmarks/probe_checkpoint_interference.py [--gb 4] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time

import torch
import torch.distributed.checkpoint as dcp


def step_loop(seconds: float) -> float:
    """Steps per second of a stand-in RL step (decode-like then training-like) over ``seconds``."""
    small = torch.randn(1, 1024, device="cuda")
    weights = [torch.randn(1024, 1024, device="cuda") for _ in range(8)]
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    steps, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(64):  # decode: 8 launches a token, the token read back
            x = small
            for w in weights:
                x = torch.tanh(x @ w)
            x[0, 0].item()
        for _ in range(8):  # training: large matmuls
            big = (big @ big).clamp_(-1, 1)
        torch.cuda.synchronize()
        steps += 1
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    chunk = 256 * 2**20
    count = max(1, int(args.gb * 2**30 // chunk))
    device_state = {f"t{i}": torch.empty(chunk // 4, device="cuda") for i in range(count)}
    host_state = {name: torch.empty(t.shape, pin_memory=True) for name, t in device_state.items()}
    shm = tempfile.mkdtemp(dir="/dev/shm", prefix="probe_ckpt_")
    disk = tempfile.mkdtemp(prefix="probe_ckpt_")
    stream = torch.cuda.Stream()

    def d2h(stop: threading.Event) -> None:
        while not stop.is_set():
            with torch.cuda.stream(stream):
                for name, t in device_state.items():
                    host_state[name].copy_(t, non_blocking=True)
            stream.synchronize()

    def torch_save(stop: threading.Event) -> None:
        while not stop.is_set():
            with open(os.path.join(shm, "state.pt"), "wb") as f:
                torch.save(host_state, f)

    def dcp_save(stop: threading.Event) -> None:
        while not stop.is_set():
            dcp.save(host_state, checkpoint_id=os.path.join(shm, "dcp"), no_dist=True)

    def disk_copy(stop: threading.Event) -> None:
        source = os.path.join(shm, "blob")
        with open(source, "wb") as f:
            for t in host_state.values():
                f.write(t.numpy().tobytes())
        while not stop.is_set():
            subprocess.run(["cp", source, os.path.join(disk, "blob")], check=True)
            subprocess.run(["sync"], check=True)

    step_loop(2.0)  # warm-up
    baseline = step_loop(args.seconds)
    print(f"{args.gb:.1f} GB of state; stand-in step alone: {baseline:.2f} steps/s")
    print(f"{'background':<12}{'steps/s':>9}{'slowdown %':>12}")
    for name, work in (
        ("d2h", d2h),
        ("torch_save", torch_save),
        ("dcp_save", dcp_save),
        ("disk_copy", disk_copy),
    ):
        stop = threading.Event()
        thread = threading.Thread(target=work, args=(stop,), daemon=True)
        thread.start()
        time.sleep(1.0)
        rate = step_loop(args.seconds)
        stop.set()
        thread.join()
        print(f"{name:<12}{rate:>9.2f}{100 * (baseline / rate - 1):>+12.1f}", flush=True)
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
