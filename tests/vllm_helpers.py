"""What the vLLM end-to-end tests share: an engine with kvstore's connector, greedy
generation, and waiting for the connector's background store. Imported only where vLLM
is installed (``.venv-vllm``)."""

from __future__ import annotations

import os
import time

from kvstore import SyncKVStore


def make_llm(folder: str, url: str, extra: dict | None = None, **overrides):
    """A one-process vLLM engine (bf16, eager, prefix cache off) storing raw KV at ``url``
    (or with the connector's ``extra`` config on top)."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    args = {"dtype": "bfloat16", "enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 2048,
            "distributed_executor_backend": "uni", **overrides}
    return LLM(model=folder, **args, kv_transfer_config=KVTransferConfig(
        kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.integrations.vllm",
        kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"url": url, "levels": ["raw"], **(extra or {})}))


def generate(llm, ids, max_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens after prompt ``ids``, and how many prompt tokens vLLM reported cached."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0, max_tokens=max_tokens),
                       use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens


def wait_stored(url: str, model_id: str, ids, timeout: float, levels=None) -> None:
    """Return once the store at ``url`` holds all of ``ids`` (the connector stores in the background)
    at the first of ``levels`` (default raw)."""
    deadline = time.monotonic() + timeout
    with SyncKVStore(url, **({} if levels is None else {"levels": levels})) as kvs:
        while kvs.lookup(model_id, ids) < len(ids):
            assert time.monotonic() < deadline, "the connector did not store the prompt"
            time.sleep(0.1)


def damage_chunk(url: str, model_id: str, ids, index: int) -> int:
    """Flip a byte in the middle of every object of chunk ``index`` (256-token chunks) of
    ``ids`` in the file store at ``url``; returns how many objects were damaged."""
    from kvstore.format.keys import as_token_array, chunk_hashes, model_fingerprint

    chunk = chunk_hashes(model_fingerprint(model_id), as_token_array(ids), 256)[index]
    damaged = 0
    for root, _, files in os.walk(url.removeprefix("file://")):
        if os.path.basename(root) == chunk:
            for name in files:
                path = os.path.join(root, name)
                data = bytearray(open(path, "rb").read())
                data[len(data) // 2] ^= 0xFF
                open(path, "wb").write(bytes(data))
                damaged += 1
    return damaged
