"""A GPU smoke check of the store path: kvcodec chunks decoded on CUDA equal the CPU decode."""

import asyncio

import torch

from kvstore import KVStore
from kvstore.codecs.kvcodec import KVCodecV1
from kvstore.codecs.kvcodec_profile import build_profile


def synthetic(L=4, H=2, T=600, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, H, T, D, generator=g) * torch.linspace(0.5, 4, D) + 1.0
    v = torch.randn(L, H, T, D, generator=g) * torch.exp(torch.randn(L, H, T, 1, generator=g))
    return k.half(), v.half()


async def main() -> None:
    k, v = synthetic()
    profile = build_profile([synthetic(seed=s) for s in (1, 2)], query_energy=torch.rand(4, 2, 64) + 0.1)
    levels = [KVCodecV1(profile, i) for i in range(len(profile.levels))]
    tokens = list(range(600))
    async with KVStore("memory://", levels=levels) as store:
        await store.put("gpu-check", tokens, list(zip(k.unbind(0), v.unbind(0))))
        for level in range(len(levels)):
            cpu = await store.get("gpu-check", tokens, level=level, device="cpu")
            gpu = await store.get("gpu-check", tokens, level=level, device="cuda")
            same = all(torch.equal(a.cpu(), b) and torch.equal(c.cpu(), d) for (a, c), (b, d) in zip(gpu, cpu))
            print(f"level {level}: cuda decode equals cpu decode: {same}")
            assert same and gpu[0][0].is_cuda


asyncio.run(main())
