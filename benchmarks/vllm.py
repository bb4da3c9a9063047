"""Time to first token of a reused context in vLLM's CPU engine (SmolLM2), four ways.

For each context length the second request of a prompt is timed with (a) no connector
(vLLM prefills it), (b) vLLM's own ``ExampleConnector`` (raw tensors in safetensors files on
local disk), (c) kvstore's connector at the raw level and (d) at kvcodec's default level,
on a local store; (c) and (d) again on a Redis server behind a shaped link (``tc tbf``,
:mod:`tests.tools.netshape`) where this machine can run one (root). vLLM's prefix cache
is off, so every repeat of a request loads (or computes) its prompt again.

Prompts are prefilled in one step (``max_num_batched_tokens`` = the model's length):
``ExampleConnector`` saves only the first step of a chunked prefill, and then fails to load
it. ``ExampleConnector`` reads only local files, so its figure on the shaped link is a floor,
not a measurement: its local time plus its stored bytes at the link's rate.

Each configuration runs its own engine in a child process (one vLLM engine per process);
outside the vLLM environment the benchmark runs itself in ``.venv-vllm`` (see the README's
test command, which creates it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError

LINK_RATE_BPS = 25e6  # 200 Mbit/s of payload
NEW_TOKENS = 16  # greedy tokens compared with the prefill's
MAX_MODEL_LEN = 8192  # SmolLM2's positions
LONG_CONTEXT = MAX_MODEL_LEN - 128  # "8K": room for the greedy tokens
CHECKOUT = Path(__file__).resolve().parents[1]
VLLM_ENV = CHECKOUT / ".venv-vllm"
CHILD_TIMEOUT_S = 1800


def run(quick: bool) -> dict[str, Any]:
    """The figures of issue #22's benchmark (see the module docstring)."""
    try:
        import vllm  # noqa: F401  (where it is installed, run here)
    except ModuleNotFoundError:
        return _in_vllm_env(quick)
    return _run(quick)


def _in_vllm_env(quick: bool) -> dict[str, Any]:
    python = VLLM_ENV / "bin" / "python"
    if not python.exists():
        raise ConfigError(f"vLLM is not installed here and {VLLM_ENV} does not exist: create it with the "
                          "README's test command, or run the benchmark where vLLM is installed")
    args = [str(python), "-m", "benchmarks.vllm"] + (["--quick"] if quick else [])
    return _result_of(args, timeout=2 * CHILD_TIMEOUT_S, what=f"the vLLM benchmark in {VLLM_ENV}")


def _run(quick: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from eval.corpus import documents
    from eval.model import ensure_converted, smollm2_gguf_path
    from eval.profiles import EVALUATION_SOURCE

    contexts = [2048] if quick else [2048, LONG_CONTEXT]
    repeats = 2 if quick else 3
    folder = str(ensure_converted(smollm2_gguf_path())[0])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = documents(tokenizer, sources=[EVALUATION_SOURCE], min_tokens=max(contexts) + 1, n=len(contexts) + 1, seed=22)
    prompts = {n: doc.tokens[:n].tolist() for n, doc in zip(contexts, docs)}
    warmup = docs[-1].tokens[:300].tolist()
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-vllm-") as tmp:  # the stores: ~0.5 GB at 8K
        return _measure(Path(tmp), folder, contexts, repeats, prompts, warmup)


def _measure(work: Path, folder: str, contexts: list[int], repeats: int, prompts: dict[int, list[int]],
             warmup: list[int]) -> dict[str, Any]:
    """Run every configuration's engine with its stores under ``work``; return the figures."""
    from eval.model import load_model
    from eval.profiles import model_profile
    from kvstore.integrations.vllm import model_id_of
    from tests.tools.netshape import netshape_available, shaped_redis

    profile_path = work / "smollm2.kvprofile"
    profile_path.write_bytes(model_profile(load_model("smollm2")).to_bytes())
    base = {"folder": folder, "model_id": model_id_of(folder), "prompts": prompts, "warmup": warmup,
            "repeats": repeats, "max_len": MAX_MODEL_LEN}
    kvcodec = {"levels": [["kvcodec", {}]], "profile": str(profile_path)}
    configs: dict[str, dict[str, Any]] = {
        "prefill": {},
        "example": {"connector": "ExampleConnector", "extra": {"shared_storage_path": str(work / "example")}},
        "kvstore_raw": {"connector": "KVStoreConnector", "extra": {"url": (work / "raw").as_uri(), "levels": ["raw"]}},
        "kvstore_default": {"connector": "KVStoreConnector", "extra": {"url": (work / "default").as_uri(), **kvcodec}},
    }
    results = {name: _child({**base, **config}) for name, config in configs.items()}
    link_reason = netshape_available()
    if link_reason is None:
        for name, extra in (("kvstore_raw_shaped", {"levels": ["raw"]}), ("kvstore_default_shaped", kvcodec)):
            with shaped_redis(LINK_RATE_BPS) as server:
                results[name] = _child({**base, "connector": "KVStoreConnector",
                                        "extra": {"url": server.url, "storage_options": {"socket_timeout": 120},
                                                  **extra}})
    return _figures(results, contexts, link_reason)


def _child(config: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return _result_of([sys.executable, "-m", "benchmarks.vllm", "--engine", json.dumps(config)],
                      timeout=CHILD_TIMEOUT_S, env=env, what=f"a vLLM engine of the benchmark ({config.get('connector')})")


def _result_of(args: list[str], *, timeout: float, what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``args`` and return the JSON of its last ``RESULT`` line; :class:`ConfigError` naming
    ``what`` (with the end of its output on stderr) if it fails or prints none."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=CHECKOUT)  # -m benchmarks.vllm
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise ConfigError(f"{what} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _engine(config: dict[str, Any]) -> dict[str, Any]:
    """One engine: for each prompt, a first request (stores), timed repeats, a greedy output."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    transfer = None
    if config.get("connector"):
        module = "kvstore.integrations.vllm" if config["connector"] == "KVStoreConnector" else None
        transfer = KVTransferConfig(kv_connector=config["connector"], kv_connector_module_path=module,
                                    kv_role="kv_both", kv_load_failure_policy="recompute",
                                    kv_connector_extra_config=config["extra"])
    llm = LLM(model=config["folder"], dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=config["max_len"], max_num_batched_tokens=config["max_len"],  # one prefill step
              distributed_executor_backend="uni", kv_transfer_config=transfer)

    def generate(ids: list[int], tokens: int) -> tuple[list[int], int, float]:
        started = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0, max_tokens=tokens),
                           use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens or 0, time.perf_counter() - started

    generate(config["warmup"], 1)
    out: dict[str, Any] = {}
    for n, ids in config["prompts"].items():
        before = _example_bytes(config)
        _, _, first_s = generate(ids, 1)
        stored_bytes = _stored_bytes(config, ids, before)
        timed = [generate(ids, 1) for _ in range(config["repeats"])]
        tokens, _, _ = generate(ids, NEW_TOKENS)
        out[n] = {"first_request_s": first_s, "ttft_s": statistics.median(t for _, _, t in timed),
                  "ttft_runs_s": [t for _, _, t in timed], "hit_tokens": timed[-1][1], "stored_bytes": stored_bytes,
                  "greedy_tokens": tokens}
    return out


def _example_bytes(config: dict[str, Any]) -> int:
    """Bytes in ``ExampleConnector``'s folder (0 for other configurations)."""
    if config.get("connector") != "ExampleConnector":
        return 0
    return sum(p.stat().st_size for p in Path(config["extra"]["shared_storage_path"]).rglob("*.safetensors"))


def _stored_bytes(config: dict[str, Any], ids: list[int], example_before: int) -> int | None:
    """Bytes stored for ``ids`` (waiting for the background store of kvstore's connector)."""
    if config.get("connector") == "ExampleConnector":
        return _example_bytes(config) - example_before
    if config.get("connector") != "KVStoreConnector":
        return None
    from kvstore import SyncKVStore

    deadline = time.monotonic() + 600
    with SyncKVStore(config["extra"]["url"], storage_options=config["extra"].get("storage_options")) as kvs:
        while (manifest := kvs.manifest(config["model_id"], ids)) is None:
            if time.monotonic() > deadline:
                raise ConfigError("the connector did not store the prompt within 600 s")
            time.sleep(0.05)
    return sum(obj.size for chunk in manifest.chunks for obj in chunk.objects)


def _figures(results: dict[str, dict[str, Any]], contexts: list[int], link_reason: str | None) -> dict[str, Any]:
    per_context: dict[str, Any] = {}
    for n in contexts:
        key = str(n)
        row = {name: {k: v for k, v in result[key].items() if k != "greedy_tokens"} for name, result in results.items()}
        prefill = results["prefill"][key]
        reference = prefill["greedy_tokens"]
        for name, result in results.items():
            tokens = result[key]["greedy_tokens"]
            row[name]["greedy_agreement"] = _agreement(tokens, reference)
            row[name]["ttft_vs_prefill"] = result[key]["ttft_s"] / prefill["ttft_s"]
        example, default = results["example"][key], results["kvstore_default"][key]
        row["compression_vs_example"] = example["stored_bytes"] / default["stored_bytes"]
        if "kvstore_default_shaped" in results:
            floor = example["ttft_s"] + example["stored_bytes"] / LINK_RATE_BPS
            shaped = results["kvstore_default_shaped"][key]["ttft_s"]
            row["example_shaped_floor_ttft_s"] = floor
            row["default_shaped_vs_example_floor"] = shaped / floor
            # "below ExampleConnector by at least the compression's worth": kvstore's time beyond moving
            # its own bytes is no more than ExampleConnector's local time
            row["default_shaped_overhead_s"] = shaped - default["stored_bytes"] / LINK_RATE_BPS
        per_context[key] = row
    largest = str(max(contexts))
    targets: dict[str, bool] = {}
    if max(contexts) == LONG_CONTEXT:
        targets["default_below_third_of_prefill_8k_local"] = per_context[largest]["kvstore_default"]["ttft_vs_prefill"] < 1 / 3
    if "kvstore_default_shaped" in results:
        row = per_context[largest]
        targets["default_shaped_below_example_by_compression"] = (
            row["default_shaped_overhead_s"] <= results["example"][largest]["ttft_s"])
    return {"engine": "vllm-cpu (uni executor, bf16, enforce_eager, prefix cache off)", "model": "SmolLM2-135M",
            "link_rate_Bps": LINK_RATE_BPS if link_reason is None else None, "link": link_reason or "tc tbf (netns)",
            "new_tokens": NEW_TOKENS, "contexts": per_context, "targets_met": targets}


def _agreement(tokens: list[int], reference: list[int]) -> float:
    """The fraction of ``reference``'s greedy tokens matched before the first difference."""
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same / len(reference)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--engine":
        print("RESULT " + json.dumps(_engine(json.loads(sys.argv[2]))), flush=True)
    else:
        print("RESULT " + json.dumps(run("--quick" in sys.argv[1:])), flush=True)
