"""kvstore as a vLLM KV connector: prompts' KV stored on their first request, loaded on the next.

Enable it with::

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model=path, kv_transfer_config=KVTransferConfig(
        kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.integrations.vllm",
        kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"url": "file:///var/cache/kv", "levels": ["raw"]}))

Extra config: ``url`` (any :func:`~kvstore.backends.open_store` URL; required),
``levels`` (best first, each a codec name or a ``[name, params]`` pair; ``["raw"]`` by
default; or ``"auto"``: the six levels calibrated for the model by a store bound to it,
``KVStore(url, model=...)``, which stores its profile on its first put, read from the
store at start-up, a :class:`ConfigError` where none is stored), ``profile`` (the path of
the profile file of ``["kvcodec", {"level": 2}]`` or ``["kvcodec3", {"level": 2}]`` levels,
unless a level names its own ``"profile"``: :func:`eval.profiles.model_profile` and
:func:`eval.profiles.transform_profile` make and cache them),
``load_level`` (the index in ``levels`` that loads read; 0, or 2 with ``"auto"``),
``deadline_s`` (loads stream through the adaptive fetcher instead, which picks each
chunk's level among all of ``levels`` so that the load takes at most this many seconds
at the throughput it measures, and the smallest level where it cannot; prefixes without
a manifest of their own, and sliding layers vLLM keeps whole, read ``load_level``),
``chunk_tokens`` (a multiple of vLLM's block size; 256 by default), ``max_concurrency``
(chunk objects read or written at once by a load or a save: by default one per CPU
core, at least 4 and at most 16, so that on a slow link chunks arrive one after another
and each decodes while the next is on the wire), ``namespace``,
``storage_options``, ``model_id`` (by default :func:`model_id_of` the model's folder: the
id Hugging Face code gets for it, so contexts stored from vLLM and from Hugging Face are
shared).

Scheduler side: a request's stored prefix is looked up in the background (the first call
answers "later"), rounded down to whole blocks and to one token short of the prompt
(vLLM computes at least the last token). Worker side: the stored prefix is read in a
background thread and written into the request's blocks layer by layer while the model
runs, each layer's attention waiting only for its own blocks (again into its new blocks
when a preempted request resumes), and the prompt's KV is
copied out of its blocks, layer by layer, in the step its prefill completes, then
encoded and stored off the engine's critical path. A load that fails (a missing or
corrupt chunk) reports the request's blocks, so vLLM recomputes them
(``kv_load_failure_policy="recompute"``).

Paged layouts: vLLM's CPU backend (``[blocks, kv_heads, block_size, 2 * head_size]``:
per block and head, the K elements, then the V elements, in orders the connector probes
from vLLM's own cache op), run end to end with full-attention and sliding-window models;
the GPU backends' logical ``[blocks, kv_heads, block_size, 2 * width]`` view with K and V
halves (:class:`PagedKVLayout`). MLA models and models with linear-attention layers
(Qwen3-Next) are refused.

Sliding-window models run under vLLM's hybrid allocator (the connector declares
``SupportsHMA``): each window has a KV cache group of its own, whose blocks behind the
window are vLLM's null block. A load reads, of each sliding layer, only the chunks the
window of a continuation from the loaded prefix needs, and writes only the blocks vLLM
keeps; a prompt's sliding layers are stored from the first chunk all of whose blocks
they still hold (``KVStore.put(..., sliding_from=...)``). With several KV cache groups
vLLM cannot map a failed block back to its request, so loads run in the background
there: vLLM holds the request until its load is reported done, and computes it from the
start where the load failed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvstore.decode_threads import usable_cpus
from kvstore.errors import ConfigError, KVStoreError
from kvstore.format.layout import CacheLayout
from kvstore.kv import KV
from kvstore.sync import SyncKVStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvstore")

LOOKUP_WAIT_S = 0.005  # how long the scheduler waits for a lookup before answering "later"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


BlockIds = tuple[list[int], ...]  # a request's blocks in each KV cache group (0: the null block)
NULL_BLOCK = 0  # vLLM's null block: a block behind a sliding window, freed or never allocated


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Write the stored KV of ``tokens[start:stop]`` into the request's ``block_ids``
    (in the background, where ``background``: vLLM waits for the request's load)."""

    req_id: str
    tokens: np.ndarray  # the prompt's first tokens: a stored prefix that covers ``stop``
    block_ids: BlockIds
    start: int
    stop: int
    background: bool = False
    context: np.ndarray | None = None  # the stored prefix looked up (a stored context's tokens, maybe)


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Copy the KV of ``tokens`` out of ``block_ids`` and store it."""

    req_id: str
    tokens: np.ndarray
    block_ids: BlockIds


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """What the workers do in one step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    """A request the scheduler tracks until its prompt's KV is saved."""

    tokens: np.ndarray
    block_ids: BlockIds
    save: bool


class _LayerStream:
    """How many layers (in engine order) one step's loads have written so far."""

    def __init__(self) -> None:
        self.job: concurrent.futures.Future[set[int]] | None = None
        self.written = 0
        self._changed = threading.Condition()

    def mark(self, layers: int) -> None:
        with self._changed:
            self.written = max(self.written, layers)
            self._changed.notify_all()

    def wait(self, index: int) -> None:
        """Block until layer ``index`` is written."""
        with self._changed:
            self._changed.wait_for(lambda: self.written > index)

    def result(self) -> set[int]:
        """The blocks whose load failed, once every layer is written."""
        assert self.job is not None
        return self.job.result()


def layer_index(name: str) -> int:
    """The layer number in a vLLM attention layer name (``model.layers.3.self_attn.attn``)."""
    found = _LAYER_INDEX.findall(f"{name}.")
    if not found:
        raise ConfigError(f"cannot tell the layer number of attention layer {name!r}")
    return int(found[-1])


@functools.lru_cache(maxsize=8)  # the scheduler's and the worker's connector: hash the weights once
def model_id_of(folder: str) -> str:
    """The id of the model in ``folder`` (its config and weights digest, as
    :func:`~kvstore.integrations.hf.folder_weights_digest` gives it), the one Hugging Face
    code gets for the same folder, so that contexts stored from vLLM and from Hugging Face
    are shared."""
    from transformers import AutoConfig

    from kvstore.integrations.hf import folder_weights_digest, hf_model_id

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"model_id: {folder!r} is not a local model folder; set kv_connector_extra_config['model_id']")
    return hf_model_id(AutoConfig.from_pretrained(path), folder_weights_digest(path))


def stored_model_levels(url: str, model_id: str, where: dict[str, Any]) -> list[Any]:
    """``"levels": "auto"``: the levels calibrated for ``model_id`` and stored at ``url`` by a
    store bound to the model (:meth:`~kvstore.store.KVStore.stored_levels`);
    :class:`ConfigError` at start-up where none is stored (an engine does not calibrate)."""
    with SyncKVStore(url, **where) as probe:
        levels = probe.stored_levels(model_id)
    if levels is None:
        raise ConfigError(f"levels 'auto': no codec profile of model {model_id!r} is stored at {url}; store one "
                          "context of the model once from KVStore(url, model=HFModel(model, model_id=...)) "
                          "(it calibrates and stores the profile), or give the levels")
    return levels


def connector_levels(extra: dict[str, Any]) -> list[Any]:
    """The store's levels from the extra config: names and ``[name, params]`` pairs, with
    ``kvcodec`` and ``kvcodec3`` levels built on their profile file (the level's own
    ``"profile"`` param, else ``extra["profile"]``)."""
    from kvstore.codecs.kvcodec import DEFAULT_LEVEL, KVCodec
    from kvstore.codecs.kvcodec3 import KVCodec3
    from kvstore.errors import FormatError

    profiled = {"kvcodec": KVCodec, "kvcodec3": KVCodec3}
    specs = extra.get("levels", ["raw"])
    if isinstance(specs, str) or not isinstance(specs, list | tuple):
        raise ConfigError(f"levels must be a list of codec names or [name, params] pairs, got {specs!r}")
    profiles: dict[tuple[str, str], Any] = {}
    levels: list[Any] = []
    for spec in specs:
        if isinstance(spec, list | tuple) and len(spec) == 2 and spec[0] in profiled and isinstance(spec[1], dict):
            name, params = spec
            codec = profiled[name]
            if set(params) - {"level", "profile"}:
                raise ConfigError(f"a {name} level takes only 'level' and 'profile', got {params!r}")
            path = params.get("profile", extra.get("profile"))
            if not path or not isinstance(path, str):
                raise ConfigError(f"{name} levels need 'profile': the path of the model's {name} profile file")
            if (name, path) not in profiles:
                try:
                    profiles[name, path] = codec.profile_kind.from_bytes(Path(path).read_bytes())
                except OSError as exc:
                    raise ConfigError(f"cannot read the {name} profile {path!r}: {exc}") from exc
                except FormatError as exc:
                    raise ConfigError(f"{path!r} is not a {name} profile: {exc}") from exc
            levels.append(codec(profiles[name, path], params.get("level", DEFAULT_LEVEL)))
        else:
            levels.append(tuple(spec) if isinstance(spec, list) else spec)
    return levels


@functools.lru_cache(maxsize=8)  # one probe per (dtype, block size, head size), not per layer
def _cpu_block_orders(dtype: torch.dtype, block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU cache op puts each (token, dim) element in a block's K half and V
    half: for each position, ``token * head_size + dim``. Found by running the op on probe
    values, because its K order depends on the instruction set it picked (the ``vec``
    kernels store K transposed, dim-major)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    if max(block_size, head_size) > 256:  # probe values must be exact in bf16
        raise ConfigError(f"block size {block_size} / head size {head_size} over 256 is not supported yet")
    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
    slots = torch.arange(block_size, dtype=torch.long)
    found = []
    for probe in (torch.arange(block_size).view(-1, 1, 1).expand(-1, 1, head_size),
                  torch.arange(head_size).view(1, 1, -1).expand(block_size, 1, -1)):
        cache.zero_()
        values = probe.to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(values, values, key_cache, value_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        found.append(cache.view(2, block_size * head_size).long())
    orders = found[0] * head_size + found[1]  # [2, block_size * head_size]
    for order in orders:
        if not torch.equal(order.sort().values, torch.arange(block_size * head_size)):
            raise ConfigError(f"vLLM's CPU cache op ({isa}) does not store a block as a permutation of its tokens")
    return orders[0], orders[1]


class PagedCPULayout:
    """vLLM's CPU paged KV of one layer: ``[blocks, kv_heads, block_size, 2 * head_size]``,
    where each block holds, per head, ``block_size * head_size`` K elements and then as
    many V elements, each half in the order the attention kernels want (probed once)."""

    def __init__(self, cache: torch.Tensor, block_size: int) -> None:
        if cache.dim() != 4 or cache.shape[2] != block_size or cache.shape[3] % 2:
            raise ConfigError(f"unsupported paged KV layout {tuple(cache.shape)} (block size {block_size}); "
                              "kvstore's connector reads vLLM's CPU layout [blocks, kv_heads, block_size, 2*head_size]")
        blocks, heads, _, width = cache.shape
        self.block_size, self.heads, self.head_size = block_size, heads, width // 2
        self.view = cache.view(blocks, heads, 2, block_size * self.head_size)
        self.orders = _cpu_block_orders(cache.dtype, block_size, self.head_size)
        self.inverse = tuple(torch.argsort(order) for order in self.orders)
        positions = torch.arange(block_size * self.head_size)
        dim_major = positions.view(block_size, self.head_size).t().reshape(-1)
        # each half's order as a cheap view where it is one (a gather costs far more than the copy)
        self.kinds = tuple("token_major" if torch.equal(order, positions) else
                           "dim_major" if torch.equal(order, dim_major) else "permuted" for order in self.orders)

    def read(self, block_ids: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, tokens, head_size]`` of the first ``tokens`` of ``block_ids``."""
        index = torch.as_tensor(block_ids, dtype=torch.long)
        n, bs, d = len(block_ids), self.block_size, self.head_size
        out = []
        for half in (0, 1):
            flat = self.view[index, :, half]  # a copy: [n, H, bs * D]
            if self.kinds[half] == "token_major":
                rows = flat.view(n, self.heads, bs, d)
            elif self.kinds[half] == "dim_major":
                rows = flat.view(n, self.heads, d, bs).transpose(-1, -2)
            else:
                rows = flat[..., self.inverse[half]].view(n, self.heads, bs, d)
            out.append(rows.permute(1, 0, 2, 3).reshape(self.heads, n * bs, d)[:, :tokens].contiguous())
        return out[0], out[1]

    def write(self, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``[kv_heads, len(block_ids) * block_size, head_size]`` keys and values into ``block_ids``."""
        n, bs, d = len(block_ids), self.block_size, self.head_size
        if keys.shape != (self.heads, n * bs, d) or values.shape != keys.shape:
            raise ConfigError(f"KV of shape {tuple(keys.shape)} does not fill {n} blocks of "
                              f"{self.heads} x {bs} x {d}")
        index = torch.as_tensor(block_ids, dtype=torch.long)
        for half, rows in enumerate((keys, values)):
            blocks = rows.to(self.view.dtype).view(self.heads, n, bs, d).permute(1, 0, 2, 3)  # [n, H, bs, D]
            if self.kinds[half] == "token_major":
                flat = blocks.reshape(n, self.heads, bs * d)
            elif self.kinds[half] == "dim_major":
                flat = blocks.transpose(-1, -2).reshape(n, self.heads, bs * d)
            else:
                flat = blocks.reshape(n, self.heads, bs * d)[..., self.orders[half]]
            self.view[index, :, half] = flat


class PagedKVLayout:
    """The paged KV of one layer as vLLM's GPU backends (FlashAttention, FlashInfer, Triton)
    hand it over: a logical ``[blocks, kv_heads, block_size, 2 * width]`` view, in whatever
    physical stride order the backend chose, holding per token and head its K row in the
    first half of the last axis and its V row in the second (``width`` may pad the head
    size)."""

    def __init__(self, cache: torch.Tensor, block_size: int, head_size: int) -> None:
        if cache.dim() != 4 or cache.shape[2] != block_size or cache.shape[3] % 2 or cache.shape[3] < 2 * head_size:
            raise ConfigError(f"unsupported paged KV layout {tuple(cache.shape)} (block size {block_size}, head size "
                              f"{head_size}); kvstore's connector reads [blocks, kv_heads, block_size, 2*head_size]")
        self.cache, self.block_size, self.heads, self.head_size = cache, block_size, cache.shape[1], head_size
        self.halves = (slice(0, head_size), slice(cache.shape[3] // 2, cache.shape[3] // 2 + head_size))

    def read(self, block_ids: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[kv_heads, tokens, head_size]`` of the first ``tokens`` of ``block_ids``."""
        picked = self.cache[torch.as_tensor(block_ids, dtype=torch.long, device=self.cache.device)]
        n = len(block_ids)
        return tuple(picked[..., half].permute(1, 0, 2, 3).reshape(self.heads, n * self.block_size, self.head_size)
                     [:, :tokens].contiguous() for half in self.halves)  # type: ignore[return-value]

    def write(self, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``[kv_heads, len(block_ids) * block_size, head_size]`` keys and values into ``block_ids``."""
        n = len(block_ids)
        if keys.shape != (self.heads, n * self.block_size, self.head_size) or values.shape != keys.shape:
            raise ConfigError(f"KV of shape {tuple(keys.shape)} does not fill {n} blocks of "
                              f"{self.heads} x {self.block_size} x {self.head_size}")
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.cache.device)
        for half, rows in zip(self.halves, (keys, values)):
            blocks = rows.view(self.heads, n, self.block_size, self.head_size).permute(1, 0, 2, 3)
            self.cache[index, :, :, half] = blocks.to(device=self.cache.device, dtype=self.cache.dtype)


def _model_layout(vllm_config: VllmConfig) -> CacheLayout:
    """What each layer of the served model caches, read from its Hugging Face config (so that
    contexts stored from vLLM and from Hugging Face carry the same layout)."""
    from kvstore.integrations.hf import cache_layout

    return cache_layout(vllm_config.model_config.hf_config)


def _attention_backends(vllm_config: VllmConfig, names: list[str]) -> dict[str, str]:
    """The attention backend's name of each of the layers ``names`` (where vLLM says)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, names)  # type: ignore[type-abstract]
    return {name: layer.get_attn_backend().get_name() for name, layer in layers.items()}


def _backend_of_device(cache: torch.Tensor) -> str:
    return "CPU_ATTN" if cache.device.type == "cpu" else "FLASH_ATTN"


# vLLM attention backends by how their paged cache holds a layer's KV
CPU_BACKENDS = ("CPU_ATTN",)
KV_HALVES_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")


def paged_layout(backend: str, cache: torch.Tensor, block_size: int, head_size: int) -> PagedCPULayout | PagedKVLayout:
    """The reader/writer of one layer's paged cache under attention backend ``backend``."""
    if backend in CPU_BACKENDS:
        return PagedCPULayout(cache, block_size)
    if backend in KV_HALVES_BACKENDS:
        return PagedKVLayout(cache, block_size, head_size)
    raise ConfigError(f"vLLM attention backend {backend!r} is not supported by kvstore's connector yet "
                      f"(supported: {', '.join(CPU_BACKENDS + KV_HALVES_BACKENDS)})")


class KVStoreConnector(KVConnectorBase_V1, SupportsHMA):
    """A vLLM V1 KV connector backed by a :class:`~kvstore.store.KVStore`."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        if "url" not in extra:
            raise ConfigError("kv_connector_extra_config needs 'url': the kvstore to use")
        if vllm_config.model_config.use_mla:
            raise ConfigError("kvstore's vLLM connector does not support MLA models yet (vLLM caches one latent per "
                              "token, [blocks, block_size, kv_lora_rank + rope dim], which it cannot read or write); "
                              "serve this model without the connector")
        self.block_size = vllm_config.cache_config.block_size
        chunk_tokens = int(extra.get("chunk_tokens", 256))
        if chunk_tokens <= 0 or chunk_tokens % self.block_size:
            raise ConfigError(f"chunk_tokens ({chunk_tokens}) must be a positive multiple of vLLM's block size "
                              f"({self.block_size})")
        self.chunk_tokens = chunk_tokens
        self.model_id = str(extra.get("model_id") or model_id_of(vllm_config.model_config.model))
        self.layout = _model_layout(vllm_config)
        if self.layout.has_linear:
            raise ConfigError(f"kvstore's vLLM connector does not support linear-attention layers yet "
                              f"({self.layout.describe()}); serve this model without the connector")
        # several KV cache groups (the hybrid allocator: sliding-window groups beside the full ones):
        # vLLM cannot map a failed block back to its request there, so loads run in the background
        # and report failed requests instead
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self.background_loads = len(groups) > 1
        auto = extra.get("levels") == "auto"
        where = {"namespace": extra.get("namespace", "kvstore"), "storage_options": extra.get("storage_options")}
        from kvstore.codecs.kvcodec import DEFAULT_LEVEL  # here: importing it with the module upsets vLLM's start-up

        self.load_level = int(extra.get("load_level", DEFAULT_LEVEL if auto else 0))  # auto: a bound store's default
        deadline = extra.get("deadline_s")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int | float)
                                     or not deadline > 0):
            raise ConfigError(f"deadline_s must be a positive number of seconds, got {deadline!r}")
        self.deadline_s: float | None = None if deadline is None else float(deadline)
        self._throughput_Bps: float | None = None  # measured on the latest load by deadline
        # chunks in flight per load: about one per core, so that on a slow link chunks arrive one
        # after another and each decodes while the next is on the wire (not all at the end)
        in_flight = extra.get("max_concurrency", min(16, max(4, usable_cpus())))
        self.kvs = SyncKVStore(extra["url"], chunk_tokens=chunk_tokens, max_concurrency=in_flight,
                               levels=stored_model_levels(extra["url"], self.model_id, where) if auto
                               else connector_levels(extra), **where)  # fmt: skip
        # scheduler side
        self._lookups: dict[str, concurrent.futures.Future[tuple[int, int]]] = {}
        self._hits: dict[str, tuple[int, int]] = {}  # req_id -> (loadable tokens, stored tokens)
        self._pending: dict[str, _Pending] = {}
        self._loads: dict[str, LoadSpec] = {}
        self._started: list[LoadSpec] = []  # background loads planned since the last step
        # worker side
        self._layers: dict[str, PagedCPULayout | PagedKVLayout] = {}
        self._order: list[str] = []
        self._index: dict[str, int] = {}  # layer name -> position in _order
        self._group: dict[str, int] = {}  # layer name -> its KV cache group
        self._windowed: dict[str, bool] = {}  # layer name -> vLLM keeps only its window's blocks
        self._staged: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._held_from: dict[str, int] = {}  # req_id -> first token its windowed layers hold
        self._load_errors: set[int] = set()
        self._receiving: dict[str, concurrent.futures.Future[bool]] = {}  # background loads: ok?
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-load")
        self._streaming: _LayerStream | None = None  # this step's loads, written layer by layer
        self._saves: list[concurrent.futures.Future[Any]] = []

    # -- scheduler side ---------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored tokens beyond ``num_computed_tokens`` (whole blocks, one short of the prompt);
        ``None`` while the lookup runs. Loaded in the background with several KV cache groups."""
        req_id = request.request_id
        if req_id not in self._hits:
            future = self._lookups.get(req_id)
            if future is None:
                tokens = np.asarray(request.prompt_token_ids or [], dtype=np.int64)
                future = self._lookups[req_id] = self.kvs.submit(lambda store: self._lookup(store, tokens))
            try:
                self._hits[req_id] = future.result(timeout=LOOKUP_WAIT_S)
            except concurrent.futures.TimeoutError:
                return None, False
            except Exception as exc:  # a store that cannot answer must not stop the engine: compute
                log.warning("lookup for request %s failed (%s): computing it", req_id, exc)
                self._hits[req_id] = (0, 0)
            finally:
                if future.done():
                    self._lookups.pop(req_id, None)
        loadable, _ = self._hits[req_id]
        matched = max(0, loadable - num_computed_tokens)
        return matched, self.background_loads and matched > 0

    async def _lookup(self, store: Any, tokens: np.ndarray) -> tuple[int, int]:
        if len(tokens) < 2:
            return 0, 0
        stored = await store.lookup(self.model_id, tokens, level=self.load_level)
        loadable = min(stored, len(tokens) - 1) // self.block_size * self.block_size
        return loadable, stored

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Plan the load of the stored prefix into the blocks just allocated."""
        req_id = request.request_id
        tokens = np.asarray(request.prompt_token_ids or [], dtype=np.int64)
        loadable, stored = self._hits.get(req_id, (0, 0))
        if num_external_tokens > 0:
            block_ids = tuple(list(ids) for ids in blocks.get_block_ids())
            start = loadable - num_external_tokens
            # what get() can read: whole chunks (their hashes cover whole chunks) or a stored context
            fetch = min(stored, -(-loadable // self.chunk_tokens) * self.chunk_tokens)
            load = LoadSpec(req_id, tokens[:fetch], block_ids, start, loadable, self.background_loads, tokens[:stored])
            if load.background:  # vLLM holds the request back until the worker reports the load done
                self._started.append(load)
            else:
                self._loads[req_id] = load
        self._pending.setdefault(req_id, _Pending(tokens, (), save=stored < len(tokens)))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads, and the saves of prompts whose prefill completes in it."""
        meta = KVStoreConnectorMetadata(loads=self._started)
        self._started = []
        progress: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            pending = self._pending.get(new.req_id)
            if pending is None:
                continue
            pending.block_ids = tuple(list(ids) for ids in new.block_ids)
            progress[new.req_id] = new.num_computed_tokens
            if new.req_id in self._loads:
                meta.loads.append(self._loads.pop(new.req_id))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids and req_id in self._loads:
                # resumed after a preemption freed its blocks: its stored prefix is loaded again
                meta.loads.append(self._loads.pop(req_id))
            pending = self._pending.get(req_id)
            if pending is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids or not pending.block_ids:
                    pending.block_ids = tuple(list(ids) for ids in new_blocks)
                else:
                    pending.block_ids = tuple(old + list(ids) for old, ids in zip(pending.block_ids, new_blocks,
                                                                                  strict=True))
            progress[req_id] = cached.num_computed_tokens[i]
        for req_id, computed in progress.items():
            pending = self._pending[req_id]
            done = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if done >= len(pending.tokens):  # the prompt's KV is complete after this step
                if pending.save:
                    meta.saves.append(SaveSpec(req_id, pending.tokens, pending.block_ids))
                del self._pending[req_id]
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """A request whose background load failed is computed: never offered a load again."""
        for req_id in connector_output.failed_recving or ():
            self._hits[req_id] = (0, 0)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request (its saved KV was copied out of its blocks already)."""
        for table in (self._hits, self._pending, self._loads, self._lookups):
            table.pop(request.request_id, None)
        return False, None

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """:meth:`request_finished` under the hybrid allocator (blocks of every KV cache group)."""
        return self.request_finished(request, block_ids[0] if block_ids else [])

    # -- worker side ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take the engine's per-layer paged caches, in layer order, with each layer's KV
        cache group (and whether vLLM keeps only the blocks of its sliding window)."""
        from vllm.v1.kv_cache_interface import SlidingWindowSpec

        self._order = sorted(kv_caches, key=layer_index)
        self._index = {name: i for i, name in enumerate(self._order)}
        backends = _attention_backends(self._vllm_config, self._order)
        head_size = self._vllm_config.model_config.get_head_size()
        self._layers = {name: paged_layout(backends.get(name) or _backend_of_device(kv_caches[name]), kv_caches[name],
                                           self.block_size, head_size) for name in self._order}
        groups = self._kv_cache_config.kv_cache_groups if self._kv_cache_config is not None else []
        for g, group in enumerate(groups):
            for name in group.layer_names:
                self._group[name] = g
                self._windowed[name] = isinstance(group.kv_cache_spec, SlidingWindowSpec)
        for name in self._order:
            self._group.setdefault(name, 0)
            self._windowed.setdefault(name, False)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start this step's loads and return: their stored KV is read, then written into the
        blocks layer by layer while the model runs (:meth:`wait_for_layer_load` holds each
        layer until it is in place); loads vLLM waits for (several KV cache groups) run in
        the background across steps."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        step = [load for load in meta.loads if not load.background]
        for load in meta.loads:
            if load.background:
                self._receiving[load.req_id] = self._loader.submit(self._load, load)
        if step:
            self._streaming = stream = _LayerStream()
            stream.job = self._loader.submit(self._load_layer_by_layer, step, stream)

    def _read(self, load: LoadSpec) -> tuple[KV, int]:
        """``load``'s stored KV, one entry per engine layer, and the token it ends at: through
        the adaptive fetcher where a deadline is set and the stored prefix is a context with a
        manifest, else at ``load_level``."""
        found = self._fetch_by_deadline(load) if self._adaptive(load) else None
        if found is None:
            # windowed layers (vLLM's hybrid allocator) hold only the blocks their window needs
            found = (self.kvs.get(self.model_id, load.tokens, level=self.load_level,
                                  sliding_window_only=any(self._windowed.values()), continue_at=load.stop),
                     len(load.tokens))
        if len(found[0]) != len(self._order):
            raise ConfigError(f"stored KV has {len(found[0])} layers, the engine {len(self._order)}")
        return found

    def _adaptive(self, load: LoadSpec) -> bool:
        """Whether the adaptive fetcher can serve ``load``: it reads only the windows of
        sliding layers, which vLLM wants only where it keeps just their windows."""
        if self.deadline_s is None or load.context is None:
            return False
        return all(self._windowed[name] or spec.window is None for name, spec in zip(self._order, self.layout.layers))

    def _fetch_by_deadline(self, load: LoadSpec) -> tuple[KV, int] | None:
        """The stored context ``load`` reads from streamed by :class:`~kvstore.fetch.AdaptiveFetcher`,
        each chunk at the best level the deadline affords at the throughput measured
        (starting from the last load's); ``None`` where the stored prefix has no manifest of
        its own (a prefix of a longer stored context)."""
        from kvstore.errors import ContextNotFoundError
        from kvstore.fetch import AdaptiveFetcher

        context = load.context
        assert context is not None

        async def fetch(store: Any) -> Any:
            fetcher = AdaptiveFetcher(store, prior_Bps=self._throughput_Bps)
            return await fetcher.load(self.model_id, context, deadline_s=self.deadline_s,  # type: ignore[arg-type]
                                      continue_at=load.stop)

        try:
            result = self.kvs.submit(fetch).result()
        except ContextNotFoundError:
            return None
        spans = [(d.fetch_start, d.fetch_end) for d in result.decisions if d.fetch_end is not None]
        if spans and result.bytes_fetched:
            seconds = max(end for _, end in spans) - min(start for start, _ in spans)
            self._throughput_Bps = result.bytes_fetched / max(seconds, 1e-6)
        log.debug("request %s loaded by deadline:\n%s", load.req_id, result.table())
        return result.kv, len(context)

    def _write(self, load: LoadSpec, name: str, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        """Write one layer's stored KV of ``load`` (up to token ``end``) into the blocks vLLM keeps for it."""
        first, last = load.start // self.block_size, load.stop // self.block_size
        ids = load.block_ids[self._group[name]]
        begin = next((b for b in range(first, last) if ids[b] != NULL_BLOCK), last)
        held = end - keys.shape[1]  # the first token the store returned for this layer
        if begin < last and begin * self.block_size < held:
            raise ConfigError(f"layer {name}: stored KV starts at token {held}, its blocks at "
                              f"{begin * self.block_size}")
        rows = slice(begin * self.block_size - held, last * self.block_size - held)
        self._layers[name].write(ids[begin:last], keys[:, rows], values[:, rows])

    def _failed(self, load: LoadSpec, exc: Exception) -> list[int]:
        """Log ``load``'s failure; its blocks (of the first KV cache group), for vLLM to recompute."""
        log.warning("loading %d stored tokens of request %s failed (%s): vLLM recomputes them",
                    load.stop - load.start, load.req_id, exc)
        return load.block_ids[0][load.start // self.block_size:load.stop // self.block_size]

    def _load(self, load: LoadSpec) -> bool:
        """Write ``load``'s stored KV into its blocks; ``False`` (logged) where it could not be read."""
        try:
            kv, end = self._read(load)
            for name, (keys, values) in zip(self._order, kv):
                self._write(load, name, keys, values, end)
            return True
        except KVStoreError as exc:
            self._failed(load, exc)
            return False

    def _load_layer_by_layer(self, loads: list[LoadSpec], stream: _LayerStream) -> set[int]:
        """Read every load of a step, then write them layer by layer, marking each layer done
        on ``stream``; returns the blocks of the loads that failed (vLLM recomputes them)."""
        errors: set[int] = set()
        read: list[tuple[LoadSpec, tuple[KV, int]]] = []
        try:
            for load in loads:
                try:
                    read.append((load, self._read(load)))
                except KVStoreError as exc:
                    errors.update(self._failed(load, exc))
            dropped: set[int] = set()
            for index, name in enumerate(self._order):
                for j, (load, (kv, end)) in enumerate(read):
                    if j in dropped:
                        continue
                    try:
                        self._write(load, name, *kv[index], end)
                    except KVStoreError as exc:
                        errors.update(self._failed(load, exc))
                        dropped.add(j)
                stream.mark(index + 1)
        finally:
            stream.mark(len(self._order))  # never leave the model waiting
        return errors

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Return once this step's loads have written layer ``layer_name``'s blocks."""
        if self._streaming is not None and layer_name in self._index:
            self._streaming.wait(self._index[layer_name])

    def _finish_step_loads(self) -> None:
        """Wait for this step's loads (every layer is written) and collect their failures."""
        if self._streaming is not None:
            self._load_errors |= self._streaming.result()
            self._streaming = None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Copy this layer's KV of every prompt whose prefill completes in this step (zeros in
        the null blocks behind a sliding window, which are not stored)."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        if not meta.saves or layer_name not in self._layers:
            return
        index, layer = self._index[layer_name], self._layers[layer_name]
        for save in meta.saves:
            blocks = save.block_ids[self._group[layer_name]][: -(-len(save.tokens) // self.block_size)]
            freed = next((b for b, block in enumerate(blocks) if block != NULL_BLOCK), len(blocks))
            keys, values = layer.read(blocks[freed:], len(save.tokens) - freed * self.block_size)
            if freed:
                keys, values = (torch.cat([t.new_zeros(t.shape[0], freed * self.block_size, t.shape[2]), t], dim=1)
                                for t in (keys, values))
                self._held_from[save.req_id] = max(self._held_from.get(save.req_id, 0), freed * self.block_size)
            self._staged.setdefault(save.req_id, {})[index] = (keys, values)

    def wait_for_save(self) -> None:
        """Hand each complete prompt's KV to the store in the background."""
        self._finish_step_loads()
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        for save in meta.saves:
            staged = self._staged.pop(save.req_id, {})
            held_from = self._held_from.pop(save.req_id, 0)
            if len(staged) != len(self._order):
                log.warning("request %s: %d of %d layers captured, not stored", save.req_id, len(staged), len(self._order))
                continue
            kv = [staged[i] for i in range(len(self._order))]
            # the chunks of windowed layers from the first one all of whose blocks were held
            sliding_from = -(-held_from // self.chunk_tokens) * self.chunk_tokens
            self._saves.append(self.kvs.submit(
                lambda store, kv=kv, tokens=save.tokens, sliding_from=sliding_from: store.put(
                    self.model_id, tokens, kv, layout=self.layout, sliding_from=sliding_from)))
        self._saves = [f for f in self._saves if not self._finished_save(f)]

    @staticmethod
    def _finished_save(future: concurrent.futures.Future[Any]) -> bool:
        if not future.done():
            return False
        if future.exception() is not None:
            log.warning("storing a prompt's KV failed: %s", future.exception())
        return True

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Background loads done since the last call, and those of them that failed (vLLM
        recomputes those requests)."""
        done = {req_id for req_id, future in self._receiving.items() if future.done()}
        failed = set()
        for req_id in done:
            future = self._receiving.pop(req_id)
            if future.exception() is not None or not future.result():
                failed.add(req_id)
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose stored KV could not be loaded since the last call (vLLM recomputes them)."""
        self._finish_step_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every background save has finished."""
        for future in self._saves:
            try:
                future.result(timeout=timeout)
            except KVStoreError as exc:
                log.warning("storing a prompt's KV failed: %s", exc)
        self._saves.clear()

    def shutdown(self) -> None:
        """Finish the background loads and saves and close the store."""
        self._loader.shutdown(wait=True)
        self.flush()
        self.kvs.close()
