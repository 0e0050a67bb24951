"""Hugging Face checkpoint I/O: ``config.json`` plus one or many ``*.safetensors`` files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raylane.models.config import ModelConfig
from raylane.models.layers import TensorParallelGroup
from raylane.models.transformer import CausalLM, WeightLoadError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint folder, single-file or sharded with an index."""
    if not os.path.isdir(model_dir):
        raise WeightLoadError(f"the checkpoint folder {model_dir!r} does not exist: check the path")
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightLoadError(
                f"{index_path} is not a valid safetensors index (a JSON object with a 'weight_map' of "
                f"tensor name -> shard file): {exc!r}; re-download or re-export the checkpoint"
            ) from None
        missing = [name for name in files if not os.path.isfile(os.path.join(model_dir, name))]
        if missing:
            raise WeightLoadError(
                f"{INDEX_FILE} in {model_dir!r} names shard files that are not there: {missing}"
            )
        return [os.path.join(model_dir, name) for name in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(name for name in os.listdir(model_dir) if name.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, name) for name in found]
    raise WeightLoadError(
        f"no weights in {model_dir!r}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards "
        "(only safetensors checkpoints are read)"
    )


def iter_checkpoint_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, one file open at a time.

    A file that cannot be read (truncated, corrupt, not safetensors) raises `WeightLoadError` naming it.
    """
    for path in checkpoint_files(model_dir):
        with _open_safetensors(path) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:
                    raise _unreadable(path, exc) from exc
                yield name, tensor


def check_checkpoint(model_dir: str) -> None:
    """Fail fast, naming the file, unless ``config.json`` parses and every safetensors file's header
    is intact and covers the file (which catches truncation); reads no tensor data."""
    ModelConfig.from_pretrained(model_dir)
    for path in checkpoint_files(model_dir):
        with _open_safetensors(path):
            pass


def _open_safetensors(path: str):
    # safetensors raises its own error types (and OSError): any of them means the file is bad.
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: str, exc: Exception) -> WeightLoadError:
    return WeightLoadError(
        f"cannot read {path} ({os.path.getsize(path)} bytes): {exc}. The file is truncated or corrupt "
        "(an interrupted download or save?): re-download or re-export the checkpoint"
    )


def load_model(
    model_dir: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tp: TensorParallelGroup | None = None,
) -> CausalLM:
    """Build the model described by ``model_dir/config.json`` and load its weights."""
    config = ModelConfig.from_pretrained(model_dir)
    dtype = dtype or config.dtype
    with torch.device("meta"):
        model = CausalLM(config, tp)
    model = model.to_empty(device=device).to(dtype)
    # Buffers (the rotary tables) were created on meta: compute them for real.
    model.model.rotary_emb.build_tables(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_weights(iter_checkpoint_tensors(model_dir))
    logger.info("loaded %s from %s (%s, %s)", config.architecture, model_dir, dtype, device)
    return model.eval()


def save_checkpoint(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    model_dir: str,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> None:
    """Write full tensors as a Hugging Face checkpoint (sharded with an index past ``max_shard_bytes``)."""
    os.makedirs(model_dir, exist_ok=True)
    if dtype is not None:
        config = ModelConfig(**{**config.__dict__, "torch_dtype": str(dtype).removeprefix("torch.")})
    config.save(model_dir)
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None else t.detach()).cpu().contiguous()
        for name, t in state.items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(model_dir, SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(model_dir, filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_model(model: CausalLM, model_dir: str, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Save an unsharded (TP size 1) model as a Hugging Face checkpoint."""
    if model.tp.size != 1:
        raise ValueError("save_model needs full tensors; gather tensor-parallel shards before saving")
    save_checkpoint(dict(model.named_parameters()), model.config, model_dir, max_shard_bytes)
