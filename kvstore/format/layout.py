"""A model's KV cache layout: what each layer caches, and the layer groups stored apart.

Models cache different things per layer: full attention keeps every token, a
sliding-window layer only needs the last ``window - 1`` tokens to continue, a
chunked-attention layer only the tokens of the current attention chunk, and
MLA (DeepSeek-V3) caches a compressed latent in the key slot and the rotary
key part in the value slot, with different widths, and a linear-attention layer
(Qwen3-Next's gated DeltaNet) caches no per-token KV at all but two fixed-size
states: a causal convolution's last inputs and a recurrent ``[heads, key_dim,
value_dim]`` matrix. Key and value widths and KV heads may differ per layer.

Layers that cache the same kind of thing with the same shape form a *group*.
Each chunk of a context is stored as one object per (level, group), so that a
prefix load reads every chunk of the full-attention groups but only the chunks
of a sliding group that overlap its window; a linear-attention group's object of
a chunk holds its states after the chunk's last token, and a load reads only the
one at the prefix's end. The layout is recorded in every
manifest (and once per model on the store) and checked on every load, like the
model fingerprint. It is plain data: :mod:`kvstore.integrations.hf` derives it
from a transformers config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import ConfigError, FormatError
from kvstore.format import container

#: attention kinds whose cache holds per-token KV
TOKEN_KINDS = ("full", "sliding", "chunked")
#: every layer kind: the per-token ones and ``linear`` (fixed-size states)
KINDS = (*TOKEN_KINDS, "linear")
#: what the two slots of a layer hold: post-RoPE keys and values, or an MLA latent and rotary key
SLOTS = ("kv", "mla")
MAX_LAYERS = 4096
MAX_DIM = 1 << 16
MAX_TOKEN_BYTES = 1 << 24  # one token's KV in every layer, fp32: 30x a 405B-parameter model's
MAX_STATE_BYTES = 1 << 31  # one snapshot of every linear layer's states, fp32: 28x Qwen3-Next-80B's


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """What one layer caches per token: ``kv_heads`` x ``key_dim`` in the key slot and
    ``kv_heads`` x ``value_dim`` in the value slot.

    ``kind``: ``full`` (every token is attended), ``sliding`` (the last ``window`` tokens,
    the current one included), ``chunked`` (tokens of the current ``window``-token chunk;
    stored like a sliding window of that size) or ``linear`` (no per-token KV: a
    ``[conv_channels, conv_width]`` convolution state and a ``[kv_heads, key_dim,
    value_dim]`` recurrent state, see :class:`~kvstore.kv.LinearStates`). ``slots``:
    ``kv`` for post-RoPE keys and values, ``mla`` for an MLA latent (key slot) and rotary
    key (value slot)."""

    kind: str
    kv_heads: int
    key_dim: int
    value_dim: int
    window: int | None = None
    slots: str = "kv"
    conv_channels: int | None = None
    conv_width: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"layer kind must be one of {KINDS}, got {self.kind!r}")
        if self.slots not in SLOTS:
            raise ConfigError(f"layer slots must be one of {SLOTS}, got {self.slots!r}")
        for name in ("kv_heads", "key_dim", "value_dim"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= MAX_DIM:
                raise ConfigError(f"layer {name} must be an int in [1, {MAX_DIM}], got {value!r}")
        if self.kind in ("full", "linear"):
            if self.window is not None:
                raise ConfigError(f"a {self.kind} layer has no window")
        elif type(self.window) is not int or self.window < 2:
            raise ConfigError(f"a {self.kind} layer needs a window of at least 2 tokens, got {self.window!r}")
        conv = (self.conv_channels, self.conv_width)
        if self.kind == "linear":
            if self.slots != "kv" or not all(type(d) is int and 0 < d <= MAX_DIM for d in conv):
                raise ConfigError(f"a linear layer needs conv_channels and conv_width in [1, {MAX_DIM}] "
                                  f"(and kv slots), got {conv!r}")
        elif conv != (None, None):
            raise ConfigError(f"only linear layers have a convolution state, not {self.kind} ones")

    @property
    def per_token(self) -> bool:
        """Whether the layer caches KV per token (every kind but ``linear``)."""
        return self.kind in TOKEN_KINDS

    def state_shapes(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """A linear layer's state shapes: convolution ``[conv_channels, conv_width]`` and
        recurrent ``[kv_heads, key_dim, value_dim]``."""
        if self.kind != "linear":
            raise ConfigError(f"a {self.kind} layer has no fixed-size states")
        return (self.conv_channels, self.conv_width), (self.kv_heads, self.key_dim, self.value_dim)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """A short name of what the layer caches: ``full``, ``sw512``, ``ck8192``, ``mla``..."""
        base = {"full": "full", "sliding": f"sw{self.window}", "chunked": f"ck{self.window}", "linear": "linear"}[self.kind]
        return base if self.slots == "kv" else f"{self.slots}-{base}" if self.kind != "full" else self.slots

    def first_needed(self, num_tokens: int) -> int:
        """The first token a load of ``num_tokens`` tokens must hold: 0 for full attention,
        else the last ``window`` tokens (a continuation attends the last ``window - 1``; one
        more lets a caller drop and re-feed the last token, as ``generate`` does); for a
        linear layer the last token, whose chunk's object holds the states after it."""
        if self.kind == "linear":
            return max(0, num_tokens - 1)
        if self.window is None:
            return 0
        return max(0, num_tokens - self.window)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "kv_heads": self.kv_heads, "key_dim": self.key_dim,
                               "value_dim": self.value_dim, "slots": self.slots}
        if self.window is not None:
            doc["window"] = self.window
        if self.kind == "linear":
            doc["conv_channels"], doc["conv_width"] = self.conv_channels, self.conv_width
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> LayerSpec:
        """Parse a stored layer entry; :class:`FormatError` if malformed."""
        if not (isinstance(doc, Mapping) and {"kind", "kv_heads", "key_dim", "value_dim", "slots"} <= set(doc)
                and set(doc) <= {"kind", "kv_heads", "key_dim", "value_dim", "slots", "window", "conv_channels",
                                 "conv_width"}):
            raise FormatError(f"malformed layer entry in a stored layout: {doc!r}"[:200])
        try:
            return cls(doc["kind"], doc["kv_heads"], doc["key_dim"], doc["value_dim"], doc.get("window"),
                       doc["slots"], doc.get("conv_channels"), doc.get("conv_width"))
        except ConfigError as exc:
            raise FormatError(f"stored layout: {exc}") from None


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Layers with the same :class:`LayerSpec`, stored together as one object per chunk and level.
    ``name`` is the key segment of its objects (empty when the layout has a single group)."""

    index: int
    name: str
    layers: tuple[int, ...]
    spec: LayerSpec


def _groups_of(layers: tuple[LayerSpec, ...]) -> tuple[LayerGroup, ...]:
    """Layers with equal specs grouped, in order of their first layer; each group named by its
    kind (``-2``, ``-3``, ... for more groups of one kind), or unnamed when there is one."""
    order: dict[LayerSpec, list[int]] = {}
    for i, spec in enumerate(layers):
        order.setdefault(spec, []).append(i)
    if len(order) == 1:
        spec, members = next(iter(order.items()))
        return (LayerGroup(0, "", tuple(members), spec),)
    names: dict[str, int] = {}
    groups = []
    for index, (spec, members) in enumerate(order.items()):
        name = spec.name
        seen = names.get(name, 0)
        names[name] = seen + 1
        if seen:  # same kind, other shape
            name = f"{name}-{seen + 1}"
        groups.append(LayerGroup(index, name, tuple(members), spec))
    return tuple(groups)


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """The per-layer cache layout of a model (see the module docstring)."""

    layers: tuple[LayerSpec, ...]
    #: the layer groups in order of their first layer (derived from ``layers`` once)
    groups: tuple[LayerGroup, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not 1 <= len(self.layers) <= MAX_LAYERS:
            raise ConfigError(f"a layout has 1..{MAX_LAYERS} layers")
        if not all(isinstance(spec, LayerSpec) for spec in self.layers):
            raise ConfigError("a layout's layers must be LayerSpec entries")
        if self.bytes_per_token(4) > MAX_TOKEN_BYTES:  # bounds every allocation a stored layout can ask for
            raise ConfigError(f"a layout of {self.bytes_per_token(4)} fp32 bytes per token is implausible "
                              f"(at most {MAX_TOKEN_BYTES})")
        if self.state_bytes(4) > MAX_STATE_BYTES:
            raise ConfigError(f"a layout of {self.state_bytes(4)} fp32 bytes of linear-attention states is "
                              f"implausible (at most {MAX_STATE_BYTES})")
        if not any(s.per_token for s in self.layers):
            raise ConfigError("a layout needs at least one layer with per-token KV")
        object.__setattr__(self, "groups", _groups_of(self.layers))

    @classmethod
    def uniform(cls, layers: int, kv_heads: int, head_dim: int, value_dim: int | None = None) -> CacheLayout:
        """Every layer full attention with the same shape (a Llama-style model)."""
        if type(layers) is not int or not 1 <= layers <= MAX_LAYERS:
            raise ConfigError(f"layers must be an int in [1, {MAX_LAYERS}], got {layers!r}")
        spec = LayerSpec("full", kv_heads, head_dim, head_dim if value_dim is None else value_dim)
        return cls((spec,) * layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        """Whether every layer is full attention with equal key/value shapes (one group)."""
        first = self.layers[0]
        return (len(self.groups) == 1 and first.kind == "full" and first.slots == "kv"
                and first.key_dim == first.value_dim)

    def bytes_per_token(self, element_size: int = 2) -> int:
        """One token's KV in every layer, at ``element_size`` bytes per element."""
        return element_size * sum(s.kv_heads * (s.key_dim + s.value_dim) for s in self.layers if s.per_token)

    def state_bytes(self, element_size: int = 4) -> int:
        """One snapshot of every linear layer's states, at ``element_size`` bytes per element."""
        return element_size * sum(s.conv_channels * s.conv_width + s.kv_heads * s.key_dim * s.value_dim  # type: ignore[operator]
                                  for s in self.layers if not s.per_token)

    def states_interval(self, chunk_tokens: int, element_size: int = 2) -> int:
        """How many tokens apart a store keeps linear-attention states by default: a multiple
        of ``chunk_tokens`` over which the per-token KV (at ``element_size`` bytes) weighs at
        least one snapshot of the states, so that states at most double the stored bytes.
        (Qwen3-Next-80B: one snapshot is 78 MB, the KV of 3,168 tokens in bf16.)"""
        tokens = -(-self.state_bytes() // max(1, self.bytes_per_token(element_size)))
        return chunk_tokens * max(1, -(-tokens // chunk_tokens))

    @property
    def token_layers(self) -> tuple[int, ...]:
        """The layers with per-token KV (every layer but linear-attention ones), in order:
        the rows of a codec profile of the model."""
        return tuple(i for i, s in enumerate(self.layers) if s.per_token)

    def token_rows(self, layers: Sequence[int]) -> tuple[int, ...]:
        """The positions of per-token ``layers`` among :attr:`token_layers` (their rows in a
        codec profile, which covers no linear-attention layer)."""
        rows = {layer: row for row, layer in enumerate(self.token_layers)}
        try:
            return tuple(rows[layer] for layer in layers)
        except KeyError as exc:
            raise ConfigError(f"layer {exc.args[0]} has no per-token KV") from None

    def token_spec(self) -> LayerSpec | None:
        """The first layer with per-token KV where all such layers cache keys and values of
        one shape (heads, widths, slots), as a codec profile's rows need; ``None`` where they
        differ."""
        specs = [self.layers[i] for i in self.token_layers]
        if len({(s.kv_heads, s.key_dim, s.value_dim, s.slots) for s in specs}) != 1:
            return None
        return specs[0]

    @property
    def has_linear(self) -> bool:
        """Whether any layer is a linear-attention layer (fixed-size states, no per-token KV)."""
        return any(not s.per_token for s in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the distinct layer specs and each layer's index into them."""
        specs: list[LayerSpec] = []
        index = []
        for spec in self.layers:
            if spec not in specs:
                specs.append(spec)
            index.append(specs.index(spec))
        return {"specs": [s.to_dict() for s in specs], "layers": index}

    @classmethod
    def from_dict(cls, doc: Any) -> CacheLayout:
        """Parse a stored layout; :class:`FormatError` if malformed."""
        if not (isinstance(doc, Mapping) and set(doc) == {"specs", "layers"} and isinstance(doc["specs"], list)
                and isinstance(doc["layers"], list)):
            raise FormatError("malformed stored layout")
        if not 1 <= len(doc["layers"]) <= MAX_LAYERS or not 1 <= len(doc["specs"]) <= len(doc["layers"]):
            raise FormatError("stored layout has an implausible number of layers or specs")
        specs = [LayerSpec.from_dict(s) for s in doc["specs"]]
        if not all(type(i) is int and 0 <= i < len(specs) for i in doc["layers"]):
            raise FormatError("stored layout refers to an unknown layer spec")
        try:
            return cls(tuple(specs[i] for i in doc["layers"]))
        except ConfigError as exc:
            raise FormatError(f"stored layout: {exc}") from None

    def describe(self) -> str:
        """One line: each group's name (or kind), layer count and shape."""
        parts = []
        for g in self.groups:
            s = g.spec
            dims = f"{s.key_dim}" if s.key_dim == s.value_dim else f"{s.key_dim}/{s.value_dim}"
            conv = f", conv {s.conv_channels}x{s.conv_width}" if not s.per_token else ""
            parts.append(f"{g.name or s.name} x{len(g.layers)} ({s.kv_heads}x{dims}{conv})")
        return ", ".join(parts)


def layout_of_kv(kv: Sequence[tuple[Any, Any]]) -> CacheLayout:
    """The uniform full-attention layout that ``kv`` (per layer ``(key, value)``) has, for
    callers that give no layout; :class:`ConfigError` if the layers' shapes differ."""
    if not isinstance(kv, Sequence) or not kv:
        raise ConfigError("kv must be a non-empty sequence of (key, value) pairs, one per layer")
    shapes = set()
    for i, pair in enumerate(kv):
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(getattr(t, "ndim", 0) == 3 for t in pair)):
            raise ConfigError(f"kv[{i}] must be a (key, value) pair of [kv_heads, tokens, dim] tensors")
        k, v = pair
        shapes.add((int(k.shape[0]), int(k.shape[2]), int(v.shape[2])))
    if len(shapes) != 1:
        raise ConfigError("the layers of this KV differ in shape: pass the model's layout "
                          "(kvstore.integrations.hf.cache_layout(model))")
    heads, key_dim, value_dim = shapes.pop()
    return CacheLayout.uniform(len(kv), heads, key_dim, value_dim)


LAYOUT_KIND = "kv-layout"


def layout_to_bytes(layout: CacheLayout, fingerprint: str) -> bytes:
    """The model's layout object (a container of kind ``kv-layout`` naming its model)."""
    return container.encode({}, kind=LAYOUT_KIND, meta={"fingerprint": fingerprint, "layout": layout.to_dict()})


def layout_from_bytes(data: bytes | memoryview, fingerprint: str) -> CacheLayout:
    """Parse and verify a stored layout object of the model ``fingerprint``."""
    obj = container.decode(data)
    if obj.header.kind != LAYOUT_KIND:
        raise FormatError(f"expected a {LAYOUT_KIND} object, found {obj.header.kind!r}")
    if obj.header.meta.get("fingerprint") != fingerprint:
        raise FormatError("layout object belongs to another model")
    return CacheLayout.from_dict(obj.header.meta.get("layout"))


def continuation_start(continue_at: int | None, num_tokens: int) -> int:
    """The token a continuation of ``num_tokens`` loaded tokens starts at, whose windows a
    load keeps: ``continue_at`` (checked to be an int in 1..``num_tokens``), else the end."""
    if continue_at is None:
        return num_tokens
    if not isinstance(continue_at, int) or isinstance(continue_at, bool) or not 0 < continue_at <= num_tokens:
        raise ConfigError(f"continue_at must be an int in 1..{num_tokens} (the tokens), got {continue_at!r}")
    return continue_at
