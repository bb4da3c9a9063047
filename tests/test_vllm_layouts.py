"""The connector's readers and writers of vLLM's paged GPU layouts, on synthetic tensors.

There is no vLLM GPU build here, so the GPU backends' caches (FlashAttention, FlashInfer,
Triton) are built as vLLM builds them: one allocation per layer group in each of vLLM's
physical orders (``KVCacheLayout``), seen per layer as the logical ``[blocks, kv_heads,
block_size, 2 * width]`` view; what the attention kernels read is taken the way those
backends take it (``kv_cache.transpose(1, 2).split(width, dim=-1)``). Runs in the vLLM test
environment (``.venv-vllm``); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM runs in its own environment (.venv-vllm): see the README's test command")

from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from kvstore.errors import ConfigError  # noqa: E402
from kvstore.integrations.vllm import KV_HALVES_BACKENDS, PagedKVLayout, paged_layout  # noqa: E402

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 3, 9, 2, 16, 8


def _layer_views(layout: KVCacheLayout, width: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-layer logical views of one allocation in ``layout``'s physical order."""
    logical = (LAYERS, BLOCKS, HEADS, BLOCK, 2 * width)
    physical = torch.zeros(tuple(logical[i] for i in layout.stride_order), dtype=dtype)
    inverse = [layout.stride_order.index(i) for i in range(5)]
    full = physical.permute(*inverse)
    assert full.shape == logical
    return [full[i] for i in range(LAYERS)]


def _kernel_view(cache: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches ``[blocks, block_size, heads, width]`` as the GPU backends split them."""
    key_cache, value_cache = cache.transpose(1, 2).split(width, dim=-1)
    return key_cache, value_cache


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda x: x.name)
@pytest.mark.parametrize("width", [HEAD, HEAD + 8], ids=["exact", "padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_written_kv_is_where_the_kernels_read_it(layout, width, dtype):
    caches = _layer_views(layout, width, dtype)
    block_ids, tokens = [5, 2, 7], 3 * BLOCK
    torch.manual_seed(0)
    keys, values = torch.randn(HEADS, tokens, HEAD).to(dtype), torch.randn(HEADS, tokens, HEAD).to(dtype)
    PagedKVLayout(caches[1], BLOCK, HEAD).write(block_ids, keys, values)
    key_cache, value_cache = _kernel_view(caches[1], width)
    for t in range(tokens):
        block, offset = block_ids[t // BLOCK], t % BLOCK
        assert torch.equal(key_cache[block, offset, :, :HEAD], keys[:, t])
        assert torch.equal(value_cache[block, offset, :, :HEAD], values[:, t])
    untouched = [b for b in range(BLOCKS) if b not in block_ids]
    assert not caches[1][untouched].any() and not caches[0].any() and not caches[2].any()


@pytest.mark.parametrize("layout", list(KVCacheLayout), ids=lambda x: x.name)
def test_read_returns_what_the_kernels_wrote(layout):
    cache = _layer_views(layout, HEAD, torch.bfloat16)[0]
    key_cache, value_cache = _kernel_view(cache, HEAD)
    block_ids, tokens = [8, 0, 3], 2 * BLOCK + 5  # the last block partly filled
    torch.manual_seed(1)
    keys, values = torch.randn(HEADS, tokens, HEAD).bfloat16(), torch.randn(HEADS, tokens, HEAD).bfloat16()
    for t in range(tokens):  # what vLLM's reshape_and_cache_flash does, slot by slot
        key_cache[block_ids[t // BLOCK], t % BLOCK] = keys[:, t]
        value_cache[block_ids[t // BLOCK], t % BLOCK] = values[:, t]
    got_keys, got_values = PagedKVLayout(cache, BLOCK, HEAD).read(block_ids, tokens)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


def test_backends_pick_their_layout_and_unknown_ones_are_refused():
    cache = _layer_views(KVCacheLayout.LBNHC, HEAD, torch.bfloat16)[0]
    for backend in KV_HALVES_BACKENDS:
        assert isinstance(paged_layout(backend, cache, BLOCK, HEAD), PagedKVLayout)
    with pytest.raises(ConfigError, match="FLASHMLA"):
        paged_layout("FLASHMLA", cache, BLOCK, HEAD)


def test_shapes_that_are_not_a_paged_kv_cache_are_refused():
    with pytest.raises(ConfigError, match="unsupported paged KV layout"):
        PagedKVLayout(torch.zeros(BLOCKS, BLOCK, 2 * HEAD), BLOCK, HEAD)  # an MLA-style [blocks, block_size, C]
    with pytest.raises(ConfigError, match="unsupported paged KV layout"):
        PagedKVLayout(torch.zeros(BLOCKS, HEADS, BLOCK, HEAD), BLOCK, HEAD)  # no room for V
    layout = PagedKVLayout(torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD), BLOCK, HEAD)
    with pytest.raises(ConfigError, match="does not fill"):
        layout.write([1, 2], torch.zeros(HEADS, BLOCK, HEAD), torch.zeros(HEADS, BLOCK, HEAD))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("kinds", ["probed", "permuted"])
def test_the_cpu_layout_is_what_vllms_cache_op_writes(dtype, head_size, kinds):
    """vLLM's CPU layout, against vLLM's own cache op: what the op writes reads back, and
    what the connector writes is the op's bytes. ``permuted`` forces the general gather
    in place of the views the probed orders allow."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvstore.integrations.vllm import PagedCPULayout

    block, blocks, heads = 128, 6, 2
    block_ids, tokens = [4, 1, 3], 3 * block
    torch.manual_seed(2)
    keys, values = torch.randn(heads, tokens, head_size).to(dtype), torch.randn(heads, tokens, head_size).to(dtype)
    by_op = torch.zeros(blocks, heads, block, 2 * head_size, dtype=dtype)
    key_cache, value_cache = by_op.view(blocks, heads, 2 * block, head_size).chunk(2, dim=2)
    slots = torch.tensor([block_ids[t // block] * block + t % block for t in range(tokens)], dtype=torch.long)
    ops.cpu_attn_reshape_and_cache(keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous(), key_cache,
                                   value_cache, slots, _get_attn_isa(dtype, block, head_size, "auto"),
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    by_connector = torch.zeros_like(by_op)
    readers = [PagedCPULayout(by_op, block), PagedCPULayout(by_connector, block)]
    if kinds == "permuted":
        for layout in readers:
            layout.kinds = ("permuted", "permuted")
    got_keys, got_values = readers[0].read(block_ids, tokens)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    readers[1].write(block_ids, keys, values)
    assert torch.equal(by_connector, by_op)
