"""The compiled decode step writes the KV cache in place: no step materialises a copy of a cache layer.

A KV write traced as an in-place copy into a view of the cache is functionalised by torch.compile
into "copy the whole layer, write, copy back": one layer's K or V (14.65 GiB for a colocated RL
engine on an H200) on every step. On CPU the check reads the code Inductor generates; on a GPU it
compares the peak memory of building the engine (compile and graph capture included) to the cache.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from raylane.models import load_model
from raylane.runner import EngineConfig, LLMEngine
from raylane.runner.attention import get_attention_backend
from raylane.runner.cuda_graphs import decode_logits

_BUFFER = re.compile(r"empty_strided_\w+\(\(([\d,\s]*)\)")


def _largest_buffer(code: str) -> int:
    """Elements of the largest fixed-shape buffer that generated code allocates."""
    largest = 0
    for match in _BUFFER.finditer(code):
        numel = 1
        for dim in match.group(1).replace(" ", "").split(","):
            if dim:
                numel *= int(dim)
        largest = max(largest, numel)
    return largest


def test_compiled_decode_step_allocates_no_cache_sized_buffer(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu")).eval()
    cfg = model.config
    num_blocks, block_size, batch, width = 1024, 16, 4, 4
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shape = (2, num_blocks, block_size, cfg.num_key_value_heads, head_dim)
    kv_caches = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    positions = torch.arange(batch)
    args = (
        torch.arange(batch) + 3,  # input ids
        positions,
        positions + block_size,  # slots in block 1
        torch.ones(batch, width, dtype=torch.long),  # every sequence's table starts at block 1
        positions + 1,  # sequence lengths
        torch.arange(batch + 1),
        torch.arange(batch),
    )
    backend = get_attention_backend("torch")
    compiled = torch.compile(decode_logits, fullgraph=True)
    with torch.inference_mode():
        logits, codes = run_and_get_code(compiled, model, backend, kv_caches, *args)
        written = [cache.clone() for cache in kv_caches]
        for cache in kv_caches:
            cache.zero_()
        expected = decode_logits(model, backend, kv_caches, *args)
    torch.testing.assert_close(logits, expected)
    # The compiled step wrote the cache itself (in place), as the eager step does.
    for got, want in zip(written, kv_caches):
        torch.testing.assert_close(got, want)
        assert got[:, 1].abs().sum() > 0
    layer = num_blocks * block_size * cfg.num_key_value_heads * head_dim
    largest = max(_largest_buffer(code) for code in codes)
    assert largest < layer // 8, f"a compiled buffer of {largest} elements: one cache layer's K is {layer}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_capture_peak_memory_stays_below_a_cache_layer(tiny_model_dir, backend):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = LLMEngine(
        EngineConfig(
            model=tiny_model_dir,
            device="cuda",
            attention_backend=backend,
            num_kv_blocks=1 << 20,  # 1 GiB for each layer's K (or V) in bf16: far above any fixed workspace
            max_num_seqs=8,
        )
    )
    built = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    layer_kv = engine.runner.kv_caches[0]
    one_side = layer_kv[0].numel() * layer_kv.element_size()
    assert engine.runner.graphs is not None and engine.runner.backend.name == backend
    assert peak - built < one_side // 4, (
        f"building the engine peaked {(peak - built) / 2**20:.0f} MiB above its resting memory; "
        f"one layer's K cache is {one_side / 2**20:.0f} MiB"
    )


_COMPILE_ONCE = """
import sys, torch
from torch._dynamo.utils import counters
from raylane.runner.compile_cache import use_compile_cache
use_compile_cache(sys.argv[1])
# A matrix product only: Inductor calls the ATen kernel and compiles no C++, so the test stays quick.
step = torch.compile(lambda a, b: a @ b)
step(torch.randn(8, 8), torch.randn(8, 8))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_compile_cache_is_reused_by_a_later_process(tmp_path):
    # Two fresh processes compile the same function: the first fills the cache folder, the second
    # loads its compiled graph from there instead of compiling it.
    def compile_in_a_new_process() -> tuple[int, int]:
        done = subprocess.run(
            [sys.executable, "-c", _COMPILE_ONCE, str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=240, check=True,
        )  # fmt: skip
        hits, misses = done.stdout.split()[-2:]
        return int(hits), int(misses)

    assert compile_in_a_new_process() == (0, 1)
    assert any((tmp_path / "cache" / "inductor" / "fxgraph").iterdir())
    assert compile_in_a_new_process() == (1, 0)
