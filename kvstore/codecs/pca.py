"""Learned orthonormal bases (PCA) of calibration KV, shared by the transform codecs.

A :class:`Basis` maps a ``p``-dim feature vector (e.g. the keys of a group of layers,
all heads, concatenated) to its first ``r`` principal coordinates and back:
``x ~ y @ components.T + mean``. The components are stored in fp16 (half the bytes);
the encoder takes least-squares coordinates for exactly those rounded components, so
that a round trip is the exact projection on their span. The mean and the
coordinates' variances are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.errors import CodecError

#: above this many features the basis comes from a randomized SVD of the data (Halko et
#: al.; ``torch.svd_lowrank``) instead of an eigendecomposition of the full covariance
EXACT_MAX_FEATURES = 8192
RANDOMIZED_OVERSAMPLE = 32


@dataclass(frozen=True)
class Basis:
    """``mean`` [p] float32, ``components`` [p, r] float16 (orthonormal columns, by decreasing
    variance), ``variances`` [r] float32 (of the calibration coordinates, non-increasing: a
    prefix of the components is always the strongest)."""

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor

    def __post_init__(self) -> None:
        m, c, v = self.mean, self.components, self.variances
        if (m.dtype, c.dtype, v.dtype) != (torch.float32, torch.float16, torch.float32) or m.ndim != 1 \
                or c.ndim != 2 or c.shape[0] != m.shape[0] or v.shape != (c.shape[1],):  # fmt: skip
            raise CodecError(f"a basis is float32 [p], float16 [p, r], float32 [r]; got {m.dtype}{list(m.shape)}, "
                             f"{c.dtype}{list(c.shape)}, {v.dtype}{list(v.shape)}")
        if not all(bool(torch.isfinite(t).all()) for t in (m, c, v)) or bool((v < 0).any()) \
                or bool((v[1:] > v[:-1]).any()):  # fmt: skip
            raise CodecError("a basis holds non-finite entries, or variances negative or not in decreasing order")

    @property
    def features(self) -> int:
        return self.mean.shape[0]

    @property
    def rank(self) -> int:
        return self.components.shape[1]

    def truncated(self, rank: int) -> Basis:
        """The first ``rank`` components."""
        return Basis(self.mean, self.components[:, :rank].contiguous(), self.variances[:rank].contiguous())

    def _float(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the components as float32 on ``device`` (converted once per device)."""
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            cache[device] = (self.mean.to(device), self.components.to(device, torch.float32))
        return cache[device]

    def _analysis(self, rank: int, device: torch.device) -> torch.Tensor:
        """``C (C^T C)^-1`` for the first ``rank`` components ``C`` (once per rank and device): the
        fp16 components are not exactly orthonormal, and these least-squares coordinates make
        ``reconstruct(project(x))`` the exact projection of ``x`` on their span."""
        cache = self.__dict__.setdefault("_analysis_by_rank", {})
        key = (rank, device)
        if key not in cache:
            c = self.components[:, :rank].double()
            cache[key] = (c @ torch.linalg.inv(c.T @ c)).float().to(device)
        return cache[key]

    def project(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """Coordinates ``[n, rank]`` (float32; default all ``r``) of features ``x`` ``[n, p]``."""
        mean, _ = self._float(x.device)
        return (x - mean) @ self._analysis(self.rank if rank is None else rank, x.device)

    def reconstruct(self, y: torch.Tensor) -> torch.Tensor:
        """Features ``[n, p]`` (float32) from coordinates ``y`` ``[n, k]``, on the first ``k`` components."""
        mean, c = self._float(y.device)
        return torch.addmm(mean, y, c[:, : y.shape[1]].T)


def fit_basis(x: torch.Tensor, rank: int | None = None, *, seed: int = 0) -> Basis:
    """The principal components of the rows of ``x`` ``[n, p]`` (at most ``rank`` of them,
    default all ``min(n, p)``): exact (float64 covariance) up to :data:`EXACT_MAX_FEATURES`
    features, randomized SVD beyond."""
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise CodecError(f"fit_basis needs at least 2 rows of features, got {list(x.shape)}")
    n, p = x.shape
    rank = min(n, p) if rank is None else min(int(rank), n, p)
    mean = x.double().mean(dim=0)
    if p <= EXACT_MAX_FEATURES:
        centered = x.double() - mean
        variances, vectors = torch.linalg.eigh(centered.T @ centered / n)
        variances, vectors = variances.flip(0)[:rank], vectors.flip(1)[:, :rank]
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            _, s, v = torch.svd_lowrank(x.float() - mean.float(), q=min(rank + RANDOMIZED_OVERSAMPLE, n, p), niter=4)
        finally:
            torch.random.set_rng_state(generator_state)
        variances, vectors = (s.double() ** 2 / n)[:rank], v.double()[:, :rank]
    return Basis(mean.float(), vectors.to(torch.float16).contiguous(), variances.clamp_min(0).float().contiguous())
