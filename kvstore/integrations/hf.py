"""Hugging Face transformers: KV out of and into the model's own cache objects.

The project's KV convention (see :mod:`kvstore.kv`) is a list over layers of
``(key, value)`` tensors, each ``[kv_heads, tokens, head_dim]``: the layout of
a transformers ``DynamicCache`` layer without its batch axis, keys after RoPE
exactly as the model attends them (a linear-attention layer's entry is its
fixed-size states, :class:`~kvstore.kv.LinearStates`). This module converts both ways, runs
prefill (optionally continuing from a stored prefix, which is the streaming
fetcher's recompute fallback) and names models with stable ``model_id``
strings. Written against transformers 5.x (``Cache.layers``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
import xxhash

from kvstore.errors import ConfigError, KVMismatchError
from kvstore.format.layout import CacheLayout, LayerSpec
from kvstore.kv import KV, LinearStates, check_states, is_linear

Tokens: TypeAlias = Sequence[int] | torch.Tensor
Recompute: TypeAlias = Callable[..., KV]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

# Config entries that do not change the KV a model computes from given token ids.
_CONFIG_IGNORED = frozenset(
    {
        "architectures", "dtype", "torch_dtype", "transformers_version", "quantization_config",
        "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params", "prefix",
        "output_attentions", "output_hidden_states", "return_dict", "use_cache", "tokenizer_class",
        "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
        "decoder_start_token_id", "chunk_size_feed_forward", "initializer_range", "attention_dropout",
    }
)


#: transformers' cache layer types that hold per-token KV, and the layout kind of each
_LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one token's KV for a model: ``layers`` x (key, value) x ``[kv_heads, head_dim]``."""

    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype = torch.float16) -> int:
        """Size of one token's keys and values at ``dtype``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def kv_layout(model_or_config: Any) -> KVLayout:
    """The KV layout of a transformers model (or its config)."""
    cfg = _text_config(model_or_config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return KVLayout(layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim)


def _param(model: torch.nn.Module) -> torch.nn.Parameter:
    return next(model.parameters())


def cache_layout(model_or_config: Any) -> CacheLayout:
    """The per-layer cache layout of a transformers model (or its config).

    Layer kinds come from transformers' own reading of the config (``layer_types``, else
    ``sliding_window`` / ``attention_chunk_size``), so a model's layout is what its
    ``DynamicCache`` holds: full attention, sliding windows, chunked attention, MLA
    (a ``kv_lora_rank`` latent in the key slot, the rotary key in the value slot) and
    gated-DeltaNet linear attention (Qwen3-Next: convolution and recurrent states).
    Other layers (other linear-attention caches, layers that reuse another layer's
    cache) raise :class:`ConfigError` naming the layer."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    cfg = _text_config(model_or_config)
    try:
        layer_types, per_layer = get_layer_types_and_kwargs(cfg)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read the layer types of {type(cfg).__name__}: {exc}") from None
    mla_rank = getattr(cfg, "kv_lora_rank", None)
    if mla_rank:
        heads, key_dim, value_dim, slots = 1, int(mla_rank), int(cfg.qk_rope_head_dim), "mla"
    else:
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        key_dim = value_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        slots = "kv"
    linear = _linear_spec(cfg)
    specs = []
    for i, (kind, kwargs) in enumerate(zip(layer_types, per_layer)):
        if kind == "linear_attention" and linear is not None:
            specs.append(linear)
            continue
        if kind not in _LAYER_KINDS:
            raise ConfigError(
                f"layer {i} of {getattr(cfg, 'model_type', type(cfg).__name__)} is a {kind!r} layer, which caches "
                "no per-token KV (e.g. a linear-attention state); such models are not supported yet"
            )
        window = kwargs.get("sliding_window") if _LAYER_KINDS[kind] != "full" else None
        specs.append(LayerSpec(_LAYER_KINDS[kind], int(heads), key_dim, value_dim,
                               None if window is None else int(window), slots))
    return CacheLayout(tuple(specs))


def _linear_spec(cfg: Any) -> LayerSpec | None:
    """A gated-DeltaNet layer's states (Qwen3-Next's ``linear_*`` config entries), or None
    for a config without them."""
    names = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
             "linear_conv_kernel_dim")
    dims = [getattr(cfg, name, None) for name in names]
    if not all(type(d) is int and d > 0 for d in dims):
        return None
    key_heads, value_heads, key_dim, value_dim, width = dims
    channels = 2 * key_heads * key_dim + value_heads * value_dim  # the convolved q, k and v
    return LayerSpec("linear", value_heads, key_dim, value_dim, conv_channels=channels, conv_width=width)


def kv_length(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The number of context tokens ``kv`` describes: ``kv.num_tokens`` for KV loaded from a
    store (:class:`~kvstore.kv.PrefixKV`, whose sliding-window layers may hold only the last
    tokens), else the longest layer."""
    n = getattr(kv, "num_tokens", None)
    if n is not None:
        return int(n)
    return max((int(pair[0].shape[1]) for pair in kv if not is_linear(pair) and isinstance(pair[0], torch.Tensor)
                and pair[0].ndim == 3), default=0)


def check_model_kv(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   num_tokens: int | None = None) -> int:
    """Check that ``kv`` fits ``model``'s cache layout; return the number of context tokens
    it covers (``num_tokens`` if given, else :func:`kv_length`).

    Full-attention layers must hold every token; a sliding-window layer may hold only the
    last ones (at least ``window - 1``, or all); a linear-attention layer must hold its
    states after the context's last token. Raises :class:`KVMismatchError` (a
    :class:`~kvstore.errors.ConfigError`) naming the first mismatch."""
    layout = cache_layout(model)
    if not isinstance(kv, Sequence) or len(kv) != layout.num_layers:
        got = len(kv) if isinstance(kv, Sequence) else type(kv).__name__
        raise KVMismatchError(f"model has {layout.num_layers} layers but the KV has {got}")
    for i, (pair, spec) in enumerate(zip(kv, layout.layers)):
        if not spec.per_token or is_linear(pair):
            continue  # checked below, once the context length is known
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise KVMismatchError(f"kv[{i}] must be a (key, value) pair")
        for name, t in zip(("key", "value"), pair):
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise KVMismatchError(f"kv[{i}] {name} must be [kv_heads, tokens, head_dim], got {shape}")
    total = kv_length(kv) if num_tokens is None else num_tokens
    for i, (pair, spec) in enumerate(zip(kv, layout.layers)):
        if not spec.per_token or is_linear(pair):
            _check_states(i, pair, spec, total)
            continue
        k, v = pair
        for name, t, dim in (("key", k, spec.key_dim), ("value", v, spec.value_dim)):
            if t.shape[0] != spec.kv_heads or t.shape[2] != dim:
                raise KVMismatchError(f"kv[{i}] {name} is {list(t.shape)}; the model expects "
                                      f"[{spec.kv_heads}, tokens, {dim}]")
            if not t.is_floating_point():
                raise KVMismatchError(f"kv[{i}] {name} has non-float dtype {t.dtype}")
        held = k.shape[1]
        if v.shape[1] != held:
            raise KVMismatchError(f"kv[{i}] value covers {v.shape[1]} tokens, its key {held}")
        least = total if spec.window is None else min(total, spec.window - 1)
        if not least <= held <= total:
            raise KVMismatchError(f"kv[{i}] key covers {held} tokens; a {spec.name} layer of a {total}-token "
                                  f"context needs {least if spec.window is not None else total}"
                                  + ("" if spec.window is None else f" to {total}"))
    return total


def _check_states(i: int, entry: Any, spec: LayerSpec, total: int) -> None:
    if spec.per_token or not is_linear(entry):
        raise KVMismatchError(f"kv[{i}] is a {type(entry).__name__} for a {spec.name} layer: linear-attention "
                              "layers take LinearStates, attention layers (key, value) pairs")
    check_states(i, entry, spec, total, KVMismatchError)


def kv_to_cache(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
                num_tokens: int | None = None) -> Any:
    """A ``DynamicCache`` for ``model`` holding ``kv`` (moved to the model's device and dtype)
    as the cache of a ``num_tokens``-token context (default :func:`kv_length`).

    A sliding-window layer takes the last ``window - 1`` tokens of its entry and is told the
    true context length, so positions and masks continue exactly; a linear-attention layer
    takes its states after ``num_tokens``. ``kv=None`` gives an empty cache. The caller's
    tensors are never modified."""
    from transformers import DynamicCache

    if kv is None:
        return DynamicCache(config=model.config)
    total = check_model_kv(model, kv, num_tokens)
    p = _param(model)
    cache = DynamicCache(config=model.config)
    if len(cache.layers) != len(kv):
        raise KVMismatchError(f"the model's cache has {len(cache.layers)} layers but the KV has {len(kv)}")
    for i, (layer, entry) in enumerate(zip(cache.layers, kv)):
        if is_linear(entry):
            _set_states(layer, i, entry.after(total), total, p)
            continue
        k, v = entry
        sliding = getattr(layer, "is_sliding", False)
        if sliding and k.shape[1] > layer.sliding_window - 1:
            k, v = k[:, k.shape[1] - (layer.sliding_window - 1):], v[:, v.shape[1] - (layer.sliding_window - 1):]
        layer.update(k.to(p.device, p.dtype)[None], v.to(p.device, p.dtype)[None])
        if sliding:
            layer.cumulative_length = total
    return cache


def _set_states(layer: Any, i: int, states: tuple[torch.Tensor, torch.Tensor], total: int,
                p: torch.nn.Parameter) -> None:
    """Give a linear-attention cache layer its states after ``total`` tokens."""
    if not hasattr(layer, "conv_states"):
        raise KVMismatchError(f"kv[{i}] holds linear-attention states but the model's cache layer {i} is a "
                              f"{type(layer).__name__}")
    conv, recurrent = states
    conv = conv.to(p.device, p.dtype)[None]
    recurrent = recurrent.to(p.device)[None]  # kept in the dtype the model computes it in (float32)
    layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent, conv_kernel_size=conv.shape[-1])
    layer.conv_states[0].copy_(conv)
    layer.recurrent_states[0].copy_(recurrent)
    layer.has_previous_state[0] = True
    layer.cumulative_length_linear.fill_(total)


def _states_of(layer: Any, i: int) -> LinearStates:
    """A linear-attention cache layer's current states (copies), after the tokens it has seen."""
    if not (layer.is_conv_states_initialized[0] and layer.is_recurrent_states_initialized[0]):
        raise ConfigError(f"cache layer {i} ({type(layer).__name__}) holds no linear-attention states yet")
    if layer.conv_states[0].shape[0] != 1:
        raise ConfigError(f"cache has batch size {layer.conv_states[0].shape[0]}; only batch size 1 converts to KV")
    seen = int(layer.get_seq_length())
    return LinearStates({seen: (layer.conv_states[0][0].clone(), layer.recurrent_states[0][0].clone())})


def cache_to_kv(cache: Any) -> KV:
    """The KV held by a transformers cache of batch size 1, in the project's convention
    (a sliding-window layer gives what it holds: the last tokens, or all of them while it
    records its past; a linear-attention layer its current states)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ConfigError(f"expected a transformers 5.x Cache with .layers, got {type(cache).__name__}")
    kv: KV = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "conv_states"):
            kv.append(_states_of(layer, i))  # type: ignore[arg-type]
            continue
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.ndim != 4:
            raise ConfigError(f"cache layer {i} ({type(layer).__name__}) holds no attention KV")
        if keys.shape[0] != 1:
            raise ConfigError(f"cache has batch size {keys.shape[0]}; only batch size 1 converts to KV")
        kv.append((keys[0], values[0]))
    return kv


def _as_ids(tokens: Tokens, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ConfigError(f"tokens must be 1-D (or [1, n]), got shape {list(ids.shape)}")
    return ids.to(device)


def cache_kwarg(model: Any) -> str:
    """The name a model's ``forward`` takes its cache by: ``cache`` (transformers >= 5.20)
    or ``past_key_values`` (earlier releases, such as the one vLLM pins)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model: Any, ids: torch.Tensor, cache: Any, keep: int) -> Any:
    given = {cache_kwarg(model): cache}
    try:
        return model(input_ids=ids[None], **given, use_cache=True, logits_to_keep=keep)
    except TypeError as exc:  # a model class without logits_to_keep: compute all, slice below
        if "logits_to_keep" not in str(exc):
            raise
        return model(input_ids=ids[None], **given, use_cache=True)


def prefill(
    model: Any,
    tokens: Tokens,
    cache: Any | None = None,
    *,
    chunk_tokens: int | None = None,
    logits_to_keep: int = 1,
) -> tuple[torch.Tensor, Any]:
    """Run ``tokens`` through ``model`` on top of ``cache`` (a new empty cache if None).

    Returns ``(logits, cache)``: logits ``[k, vocab]`` of the last ``k = logits_to_keep``
    tokens (``0`` keeps all) and the grown cache. ``chunk_tokens`` feeds the tokens in
    pieces to bound attention memory on long contexts (numerically near, not bit-equal).
    """
    ids = _as_ids(tokens, _param(model).device)
    n = len(ids)
    if n == 0:
        raise ConfigError("prefill needs at least one token")
    if logits_to_keep < 0:
        raise ConfigError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
    step = n if chunk_tokens is None else chunk_tokens
    if step <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
    first_kept = 0 if logits_to_keep == 0 else max(0, n - logits_to_keep)
    cache = kv_to_cache(model, None) if cache is None else cache
    pieces = []
    with torch.no_grad():
        for start in range(0, n, step):
            end = min(start + step, n)
            keep = end - max(start, first_kept)  # how many of this piece's logits are wanted
            out = _forward(model, ids[start:end], cache, max(keep, 1))
            if keep > 0:
                pieces.append(out.logits[0, -keep:])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0], cache


def recompute(
    model: Any,
    tokens: Tokens,
    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    chunk_tokens: int | None = None,
    states_every: int | None = None,
) -> KV:
    """The KV of ``tokens`` as they follow ``prefix_kv`` (the KV of earlier tokens, or none).

    This is prefill continuing from a cache: the returned KV covers ``tokens`` only
    (not the prefix) in every layer, sliding-window layers included, on the model's
    device and dtype, keys rotated for their absolute positions ``len(prefix) ...``. It
    is the streaming fetcher's fallback when a chunk's KV is slower to fetch than to
    compute.

    A linear-attention layer's entry holds its states after the last token and, with
    ``states_every``, after every multiple of that many tokens of the whole context (give
    the store's ``chunk_tokens``, or a multiple of it, so that stored prefixes can be
    continued at those chunk boundaries: the model is then fed up to each of them in turn).
    """
    layout = cache_layout(model)  # models whose caches cannot be read are refused before any work
    if states_every is not None and (type(states_every) is not int or states_every <= 0):
        raise ConfigError(f"states_every must be a positive int or None, got {states_every!r}")
    cache = kv_to_cache(model, prefix_kv)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            layer.activate_past_recording()  # sliding layers keep every new token until read
    ids = _as_ids(tokens, torch.device("cpu"))
    n = len(ids)
    if not layout.has_linear:
        _, cache = prefill(model, ids, cache, chunk_tokens=chunk_tokens)
        return _new_tokens(cache_to_kv(cache), n)
    start = kv_length(prefix_kv) if prefix_kv is not None else 0
    history: dict[int, list[Any]] = {}  # linear layer -> its states after each kept position
    for a, b, keep in _state_cuts(start, n, chunk_tokens, states_every):
        _, cache = prefill(model, ids[a:b], cache)
        if keep:
            for i, layer in enumerate(cache.layers):
                if hasattr(layer, "conv_states"):
                    history.setdefault(i, []).append(_states_of(layer, i))
    kv = _new_tokens(cache_to_kv(cache), n)
    for i, snapshots in history.items():
        kv[i] = LinearStates({pos: s.after(pos) for s in snapshots for pos in s.positions})  # type: ignore[call-overload]
    return kv


def _state_cuts(start: int, n: int, chunk_tokens: int | None, states_every: int | None) -> list[tuple[int, int, bool]]:
    """The pieces ``(from, to, keep_states)`` of ``n`` tokens following ``start`` that a
    prefill keeping linear states feeds: cut every ``chunk_tokens`` and at every multiple
    of ``states_every`` of the whole context, whose states (and the last piece's) are kept."""
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
    kept = set() if states_every is None else {m - start for m in range(states_every * (start // states_every + 1),
                                                                        start + n, states_every)}
    cuts = sorted(kept | (set(range(chunk_tokens, n, chunk_tokens)) if chunk_tokens else set()) | {n})
    return [(a, b, b in kept or b == n) for a, b in zip([0, *cuts], cuts)]


def _new_tokens(kv: KV, n: int) -> KV:
    """The last ``n`` tokens of each per-token layer of ``kv`` (linear layers as they are)."""
    out: KV = []
    for i, entry in enumerate(kv):
        if is_linear(entry):
            out.append(entry)
            continue
        k, v = entry
        if k.shape[1] < n:
            raise ConfigError(f"layer {i} cached {k.shape[1]} tokens for {n} new inputs")
        out.append((k[:, k.shape[1] - n:].contiguous(), v[:, v.shape[1] - n:].contiguous()))
    return out


def extract_kv(model: Any, tokens: Tokens, *, chunk_tokens: int | None = None,
               states_every: int | None = None) -> KV:
    """Prefill ``tokens`` and return their KV (``[kv_heads, tokens, dim]`` per layer, every
    token in every layer, sliding-window layers included; a linear-attention layer's states
    after the last token and after every multiple of ``states_every``, see :func:`recompute`)."""
    return recompute(model, tokens, None, chunk_tokens=chunk_tokens, states_every=states_every)


def make_recompute(model: Any, *, chunk_tokens: int | None = None) -> Recompute:
    """``fn(tokens, prefix_kv=None) -> KV`` bound to ``model``: the fetcher's recompute hook."""

    def fn(tokens: Tokens, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> KV:
        return recompute(model, tokens, prefix_kv, chunk_tokens=chunk_tokens)

    return fn


def generate_greedy(
    model: Any,
    context_tokens: Tokens,
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    max_new_tokens: int = 16,
) -> list[int]:
    """Greedy continuation of ``context_tokens`` by ``model.generate``, starting from ``kv``.

    ``kv`` is the KV of the context or of a prefix of it (as stored; sliding-window layers
    may hold only their last ``window`` tokens, as loaded): ``generate`` computes the
    tokens after the prefix. Of a whole context's KV the last token's entry is dropped
    and recomputed, as serving engines do to get the first logits; that cannot be done
    to linear-attention states, so such a model needs the KV of a shorter prefix (a
    stored chunk boundary). With ``kv=None`` the model prefills the context itself.
    """
    ids = _as_ids(context_tokens, _param(model).device)
    cache = None
    if kv is not None:
        covered = check_model_kv(model, kv)
        if covered > len(ids):
            raise KVMismatchError(f"kv covers {covered} tokens but the context has {len(ids)}")
        if covered < len(ids):
            cache = kv_to_cache(model, kv, num_tokens=covered)
        elif any(is_linear(entry) for entry in kv):
            raise KVMismatchError("linear-attention states cannot drop the context's last token: give the KV of "
                                  "a shorter prefix (e.g. store.get(tokens[:store.lookup(tokens[:-1])]))")
        elif len(ids) > 1:
            cache = kv_to_cache(model, [(k[:, :-1], v[:, :-1]) for k, v in kv], num_tokens=len(ids) - 1)
    with torch.no_grad():
        out = model.generate(
            ids[None], **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, do_sample=False,
            attention_mask=torch.ones_like(ids)[None],
        )
    return out[0, len(ids):].tolist()


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a model directory (or ``[path]`` for a single file), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return files


def weights_digest(paths: str | Path | Iterable[str | Path]) -> str:
    """A content hash (xxh3-128, hex) of weight files: a model directory, a file, or a list of files."""
    files = weight_files(paths) if isinstance(paths, str | Path) else [Path(p) for p in paths]
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


#: The file a converted model folder keeps beside its weights: where it came from, and the
#: digest of its source weights, which the folder's model id uses (so that a GGUF file and
#: the folder converted from it give one id).
META_FILE = "kvstore-model.json"
META_VERSION = 1


def read_source_meta(folder: Path) -> dict[str, Any] | None:
    """The conversion metadata of a model folder (:data:`META_FILE`), or None."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == META_VERSION else None


def folder_weights_digest(folder: Path) -> str:
    """The weights digest in the model id of a transformers folder: for a converted folder,
    its source's (so that loading the folder or its source gives one id), else its weight
    files'."""
    meta = read_source_meta(folder)
    return meta["source_digest"] if meta else weights_digest(folder)


def state_dict_digest(model: torch.nn.Module) -> str:
    """A content hash of a loaded model's parameters and buffers (slower fallback than files)."""
    h = xxhash.xxh3_128()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_for_id(model_or_config: Any) -> dict[str, Any]:
    """The config entries that can change a model's KV (bookkeeping entries removed)."""
    config = getattr(model_or_config, "config", model_or_config)
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if k not in _CONFIG_IGNORED and not k.startswith("_")}


def hf_model_id(model_or_config: Any, weights_digest: str | None = None) -> str:
    """A stable id naming a model's KV: ``<type>-<layers>L-<kv_heads>x<head_dim>-<hash>``.

    The hash covers the KV-relevant config (:func:`config_for_id`) and ``weights_digest``
    (see :func:`weights_digest`); if that is None and a model is given, its parameters
    are hashed (:func:`state_dict_digest`). The dtype the model runs in is not part of
    the id: KV computed in fp32 and bf16 by the same weights share it.
    """
    if weights_digest is None:
        if not isinstance(model_or_config, torch.nn.Module):
            raise ConfigError("hf_model_id needs weights_digest when given a config rather than a model")
        weights_digest = state_dict_digest(model_or_config)
    cfg = config_for_id(model_or_config)
    layout = kv_layout(model_or_config)
    blob = json.dumps({"config": cfg, "weights": weights_digest}, sort_keys=True, default=str)
    digest = hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()
    kind = str(cfg.get("model_type") or "hf").replace("/", "_")
    return f"{kind}-{layout.layers}L-{layout.kv_heads}x{layout.head_dim}-{digest}"
