"""Host buffers of lazy checkpoints that are the memory tier's shard files themselves.

A slot is a folder of DCP files (every rank's ``__R_*.distcp`` and rank 0's ``.metadata``) on the
memory tier's filesystem, written once by an ordinary ``dcp.save``. Each rank maps its own files into
memory (pinned with ``cudaHostRegister`` where CUDA is present) and finds, inside each tensor's
``torch.save`` record, the bytes of that tensor; a later snapshot of the same layout copies the
device's tensors straight into those bytes. Publishing a snapshot hard-links the slot's files into
the checkpoint's folder, so the memory tier gets the checkpoint without a second copy of the state:
no thread writes gigabytes (holding the GIL) while the next step runs.

A slot is reused only when no checkpoint folder links its files any more (their link count is 1):
the disk persister copying an older checkpoint, or the newest one kept, hold theirs. Where every slot
is held a new one is made by copying one (its layout is the same).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import struct
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

logger = logging.getLogger(__name__)

_METADATA = ".metadata"
_ZIP_LOCAL_HEADER = 30  # bytes before a zip entry's name; the name and an extra field follow


def _serialized(value) -> bytes:
    # What DCP's planner writes for a value that is not a tensor.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _layout_of(flat: dict) -> dict:
    return {
        key: (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else "object"
        for key, value in flat.items()
    }


class _Window(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of an open file, seekable from its own 0."""

    def __init__(self, file, start: int, length: int) -> None:
        self.file, self.start, self.length, self.position = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.length - self.position))
        self.file.seek(self.start + self.position)
        read = self.file.readinto(memoryview(buffer)[:count])
        self.position += read
        return read


def _tensor_bytes_offset(file, start: int, length: int, nbytes: int, key: str) -> int:
    """Offset in the file of the data of the one tensor ``torch.save`` wrote at ``[start, start + length)``."""
    with zipfile.ZipFile(_Window(file, start, length)) as record:
        data = [info for info in record.infolist() if info.filename.rsplit("/", 2)[-2:-1] == ["data"]]
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != nbytes:
            raise RuntimeError(
                f"the DCP record of {key!r} is not one uncompressed storage of {nbytes} bytes "
                f"({[(i.filename, i.file_size) for i in data]}): this torch's checkpoint format is not "
                "one lazy checkpoints can write in place; use checkpoint_mode=async"
            )
        file.seek(start + data[0].header_offset + _ZIP_LOCAL_HEADER - 4)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
    return start + data[0].header_offset + _ZIP_LOCAL_HEADER + name_length + extra_length


@dataclass(frozen=True)
class _Record:
    """Where one value of a rank's state lies in its slot files: a tensor's bytes (``tensor``) or, for
    any other value, its whole ``torch.save`` record."""

    file: str
    offset: int
    length: int
    tensor: bool = False


def _records(folder: str, rank: int, flat: dict) -> dict[str, _Record]:
    """The records of ``rank``'s values in the slot ``folder`` that ``dcp.save`` wrote from ``flat``."""
    metadata = FileSystemReader(folder).read_metadata()
    records = {}
    for index, info in metadata.storage_data.items():
        if not info.relative_path.startswith(f"__{rank}_"):
            continue  # another rank's, or deduplicated onto another rank
        value = flat[index.fqn]
        if not isinstance(value, torch.Tensor):
            records[index.fqn] = _Record(info.relative_path, info.offset, info.length)
            continue
        if not value.is_contiguous():
            raise ValueError(f"lazy checkpoints copy contiguous tensors only; {index.fqn!r} is not")
        nbytes = value.numel() * value.element_size()
        with open(os.path.join(folder, info.relative_path), "rb") as file:
            offset = _tensor_bytes_offset(file, info.offset, info.length, nbytes, index.fqn)
        records[index.fqn] = _Record(info.relative_path, offset, nbytes, tensor=True)
    return records


class _Slot:
    """One rank's files of a slot folder, mapped into memory, with a byte view of each of its tensors."""

    def __init__(self, folder: str, rank: int, records: dict[str, _Record], pin: bool) -> None:
        self.folder, self.rank, self.records, self.pinned = folder, rank, records, pin
        self.files = sorted({record.file for record in records.values()})
        self.maps = {
            name: torch.from_file(
                os.path.join(folder, name),
                shared=True,
                size=os.path.getsize(os.path.join(folder, name)),
                dtype=torch.uint8,
            )
            for name in self.files
        }
        if pin:
            self.pinned = self._pin()
        # Byte views: DCP packs its records back to back, so a tensor's data need not be aligned to
        # its element size (sources are copied in as bytes).
        self.tensors = {key: self._bytes(record) for key, record in records.items() if record.tensor}

    def _pin(self) -> bool:
        """Register the mapped files with CUDA where they are on tmpfs; elsewhere the kernel refuses to
        pin file pages for long (and the failed call would poison the next CUDA launch), so they stay
        unpinned and the copies into them are synchronous and slower."""
        if not _on_tmpfs(self.folder):
            logger.warning(
                "lazy checkpoints' host buffers in %s are not on tmpfs and cannot be pinned: snapshots "
                "copy to them synchronously; put the memory tier on /dev/shm (checkpoint_memory_dir)",
                self.folder,
            )
            return False
        for mapped in self.maps.values():
            _check_cuda(torch.cuda.cudart().cudaHostRegister(mapped.data_ptr(), mapped.numel(), 0))
        return True

    def _bytes(self, record: _Record) -> torch.Tensor:
        return self.maps[record.file][record.offset : record.offset + record.length]

    def fits(self, objects: dict[str, bytes]) -> bool:
        """Whether ``objects`` (this state's serialized non-tensor values) fit their records."""
        return all(
            len(objects[key]) == record.length for key, record in self.records.items() if not record.tensor
        )

    def write_objects(self, objects: dict[str, bytes]) -> None:
        for key, record in self.records.items():
            if not record.tensor:
                self._bytes(record).copy_(torch.frombuffer(bytearray(objects[key]), dtype=torch.uint8))

    def own_files(self) -> list[str]:
        names = self.files + ([_METADATA] if self.rank == 0 else [])
        return [os.path.join(self.folder, name) for name in names]

    def in_use(self) -> bool:
        """Whether a checkpoint folder still links one of this rank's files."""
        return any(os.stat(path).st_nlink > 1 for path in self.own_files())

    def publish(self, dcp_dir: str) -> None:
        """Hard-link this rank's files into ``dcp_dir`` (a checkpoint's DCP folder)."""
        os.makedirs(dcp_dir, exist_ok=True)
        for path in self.own_files():
            os.link(path, os.path.join(dcp_dir, os.path.basename(path)))

    def close(self) -> None:
        if self.pinned:
            for mapped in self.maps.values():
                _check_cuda(torch.cuda.cudart().cudaHostUnregister(mapped.data_ptr()))
        self.maps, self.tensors = {}, {}


def _on_tmpfs(path: str) -> bool:
    """Whether ``path`` lies on a tmpfs mount (the deepest mount point above it, from /proc/mounts)."""
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts]
    except OSError:
        return False
    above = [
        (point, kind) for point, kind in entries if path == point or path.startswith(point.rstrip("/") + "/")
    ]
    return bool(above) and max(above, key=lambda entry: len(entry[0]))[1] == "tmpfs"


def _check_cuda(code) -> None:
    if int(code) != 0:
        raise RuntimeError(
            f"pinning or unpinning a lazy checkpoint's host buffer with CUDA failed (error {int(code)})"
        )


class HostSlots:
    """One rank's slots under ``root`` (a folder on the memory tier's filesystem, shared by the ranks of
    one role). :meth:`acquire` and :meth:`rebuild` are collective over ``group``."""

    def __init__(self, root: str, group: dist.ProcessGroup) -> None:
        self.root, self.group = root, group
        self.rank = dist.get_rank(group)
        self.cuda = torch.cuda.is_available()
        self._stream = torch.cuda.Stream() if self.cuda else None
        self._copied = torch.cuda.Event() if self.cuda else None
        self._slots: list[_Slot] = []
        self._layout: dict | None = None
        self._folder = ""

    def acquire(self, flat: dict) -> _Slot | None:
        """A slot free on every rank for a snapshot of ``flat`` (a state flattened as DCP flattens it),
        its objects (schedule-dependent values such as the learning rate) already written; ``None``
        where the state's layout changed, after which :meth:`rebuild` writes the snapshot."""
        objects = {
            key: _serialized(value) for key, value in flat.items() if not isinstance(value, torch.Tensor)
        }
        same = self._layout == _layout_of(flat) and all(s.fits(objects) for s in self._slots)
        flags = torch.tensor([0 if same else 1] + [1 if s.in_use() else 0 for s in self._slots])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if flags[0]:
            return None
        free = [slot for slot, used in zip(self._slots, flags[1:].tolist(), strict=True) if not used]
        slot = free[0] if free else self._copy_slot()
        slot.write_objects(objects)
        return slot

    def rebuild(self, state: dict, flat: dict, writer_threads: int) -> _Slot:
        """Drop every slot and write ``state`` with ``dcp.save`` into a new first one (synchronous: the
        snapshot of this call is taken by it)."""
        self.close()
        generation = [uuid.uuid4().hex[:12] if self.rank == 0 else None]
        dist.broadcast_object_list(generation, src=dist.get_global_rank(self.group, 0), group=self.group)
        self._folder = os.path.join(self.root, generation[0])
        # Folders of earlier runs or layouts: their files live on in the checkpoints that link them.
        if os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name != generation[0]:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        folder = os.path.join(self._folder, "0")
        dcp.save(
            state,
            storage_writer=FileSystemWriter(folder, thread_count=writer_threads),
            process_group=self.group,
        )
        self._layout = _layout_of(flat)
        self._slots = [_Slot(folder, self.rank, _records(folder, self.rank, flat), self.cuda)]
        return self._slots[0]

    def _copy_slot(self) -> _Slot:
        source = self._slots[0]
        folder = os.path.join(self._folder, str(len(self._slots)))
        os.makedirs(folder, exist_ok=True)
        try:
            for path in source.own_files():
                shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            size = sum(os.path.getsize(path) for path in source.own_files())
            raise RuntimeError(
                f"the memory tier has no room under {self.root} for another host copy of this rank's "
                f"state ({size / 2**30:.1f} GiB; lazy checkpoints keep about three): give its tmpfs more "
                "room (the Helm chart's shm size, checkpoint_memory_dir) or use checkpoint_mode=async"
            ) from exc
        # A copy of a slot holds the same records at the same offsets.
        slot = _Slot(folder, self.rank, source.records, self.cuda)
        self._slots.append(slot)
        if len(self._slots) > 4:
            logger.warning(
                "lazy checkpoints hold %d host copies of the state: checkpoints linking them are not "
                "being pruned (a slow disk tier?)",
                len(self._slots),
            )
        return slot

    def start_copy(self, slot: _Slot, flat: dict) -> Callable[[], None]:
        """Start copying the tensors of ``flat`` into ``slot``; returns the call that finishes it. On CUDA
        the copy is queued now on a side stream, after the work queued so far; on CPU finishing is the copy."""
        if not self.cuda:
            return lambda: self._copy(slot, flat)
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._copy(slot, flat)
        self._copied.record(self._stream)

        # ``flat`` stays referenced until the copy is done: a temporary among its tensors freed now
        # could be handed to the next step's kernels while the side stream still reads it.
        def finish(sources: dict = flat) -> None:
            self._copied.synchronize()

        return finish

    @torch.no_grad()  # it may run in a forward pre-hook, in grad mode
    def _copy(self, slot: _Slot, flat: dict) -> None:
        for key, target in slot.tensors.items():
            target.copy_(flat[key].reshape(-1).view(torch.uint8), non_blocking=self.cuda)

    def order_after(self) -> None:
        """Make work queued from now on the current CUDA stream start after the copy (no host wait)."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)

    def close(self) -> None:
        for slot in self._slots:
            slot.close()
        self._slots, self._layout = [], None
