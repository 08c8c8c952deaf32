"""Cold start: what the serving path imports, the safetensors read-ahead, and the loader built on it (CPU, tiny
model). Timings are measured by bench/cold_bench.py, not asserted here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.stages import wait_ready
from support.subproc import fake_package, run_json
from function.config import Config
from function.engine import loader
from function.engine.weights import WeightReader, read_header

ROOT = Path(__file__).resolve().parents[1]




def test_engine_modules_import_without_fastapi_or_torch():
    """function/__init__ imports the Knative adapter (FastAPI) only when `new` is asked for."""
    got = run_json("""
        import json, sys
        import function.engine.loader, function.engine.client, function.engine.weights
        before = sorted(m for m in ("fastapi", "starlette", "torch", "transformers") if m in sys.modules)
        from function import new
        print(json.dumps({"before": before, "after": "fastapi" in sys.modules, "new": callable(new)}))
    """)
    assert got == {"before": [], "after": True, "new": True}


HEAVY = ("transformers", "torch._dynamo", "sympy", "torch.distributed.tensor", "torchvision", "sklearn", "pandas")


@pytest.mark.parametrize("impl", ["auto", "transformers"])
def test_serving_path_leaves_optional_heavy_packages_unimported(tmp_path, model_cache_dir, tiny_dir, impl):
    """With scikit-learn and pandas 'installed' (fake packages transformers would detect), the whole load of the
    tiny model and the engine's modules. MODEL_IMPL=auto serves the native GLM-4.1V implementation: none of
    transformers, torch._dynamo, sympy, torch.distributed.tensor, torchvision, scikit-learn or pandas is imported
    (that is what makes its cold start short). MODEL_IMPL=transformers imports transformers but still neither
    optional package (torch._dynamo and sympy do come in there: transformers' modeling modules import them)."""
    fakes = tmp_path / "site"
    fake_package(fakes, "sklearn", "scikit-learn")
    fake_package(fakes, "pandas", "pandas")
    got = run_json(f"""
        import importlib.util, json, sys
        from function.config import Config
        from function.engine import loader
        loaded = loader.load(Config.from_env({{"MODEL_CACHE_DIR": {str(model_cache_dir)!r},
                                              "MODEL_IMPL": {impl!r}}}))
        import function.engine.core, function.engine.runner, function.engine.inputs, function.engine.kv_cache
        import function.engine.sampling, function.engine.scheduler, function.engine.detokenizer
        print(json.dumps({{"findable": [importlib.util.find_spec(m) is not None for m in ("sklearn", "pandas")],
                           "imported": sorted(m for m in {HEAVY!r} if sys.modules.get(m) is not None),
                           "model": type(loaded.model).__name__, "weights": loaded.choices.weights,
                           "impl": loaded.choices.model_impl}}))
    """, env_path=[fakes])
    assert got["findable"] == [True, True]          # the check could fail: both are importable
    if impl == "auto":
        assert got["impl"] == "native" and got["model"] == "Glm4vNativeForConditionalGeneration"
        assert got["imported"] == []
    else:
        assert got["impl"] == "transformers" and got["model"] == "Glm4vForConditionalGeneration"
        assert "transformers" in got["imported"]
        assert not {"sklearn", "pandas"} & set(got["imported"])
    assert got["weights"]["tensors"] > 0           # the read-ahead path served this load


def _odd_checkpoint(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(prefix))
    tensors = {
        "a.bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(5, 3, 2, generator=g),
        "c.i64": torch.arange(7, dtype=torch.int64),
        "d.u8": torch.randint(0, 255, (1001,), dtype=torch.uint8, generator=g),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.f16": torch.randn(4, 4, generator=g).half(),
        "h.empty": torch.zeros(0, 4),
    }
    tensors = {prefix + k: v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("chunk", [64, 997, 1 << 20])
def test_weight_reader_reads_what_safetensors_reads(tmp_path, chunk):
    """Chunks smaller than a tensor, straddling tensors and larger than the file, several threads and shards."""
    for i in range(2):
        _odd_checkpoint(tmp_path / f"model-{i}-of-2.safetensors", prefix=f"layer{i}.")
    ref = {}
    for i in range(2):
        ref.update(load_file(str(tmp_path / f"model-{i}-of-2.safetensors")))
    reader = WeightReader(tmp_path, "cpu", threads=3, chunk_bytes=chunk).start()
    got = reader.result()
    assert reader.declined is None
    assert got.keys() == ref.keys() and len(got) == 16
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    assert reader.stats["bytes"] == sum(read_header(p).data_bytes for p in tmp_path.glob("*.safetensors"))


def test_weight_reader_gives_16_byte_aligned_tensors(tmp_path):
    """After an odd-sized tensor (a 4-bit checkpoint's quant_state blob) the writer packs the next ones at any
    offset; kernels with vector loads fault on those (bitsandbytes' 4-bit: "misaligned address"), so every tensor
    handed out starts on 16 bytes, views where they can be, copies where not."""
    tensors = {"a.blob": torch.arange(13, dtype=torch.uint8), "b.packed": torch.arange(64, dtype=torch.uint8),
               "c.absmax": torch.rand(8), "d.bf16": torch.randn(16, 16).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    offsets = {k: v[2] for k, v in read_header(tmp_path / "model.safetensors").tensors.items()}
    assert any(o % 16 for o in offsets.values())        # the file has misaligned tensors to begin with
    got = WeightReader(tmp_path, "cpu", chunk_bytes=32).start().result()
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
        assert got[name].data_ptr() % 16 == 0, (name, offsets[name])


def test_weight_reader_reports_a_truncated_shard(tmp_path):
    _odd_checkpoint(tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(OSError, match="end of file"):
        WeightReader(tmp_path, "cpu", chunk_bytes=256).start().result()


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_loader_reads_ahead_and_matches_from_pretrained(model_cache_dir, impl):
    """The model assembled from the read-ahead tensors equals transformers' own load of the same directory,
    parameters and the rotary buffers, for either implementation; the phases are timed."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vForConditionalGeneration

    cfg = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MODEL_IMPL": impl})
    loaded = loader.load(cfg)
    assert loaded.choices.model_impl == impl
    ref = Glm4vForConditionalGeneration.from_pretrained(cfg.tiny_model_dir, dtype=torch.float32)
    ours, theirs = loaded.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # transformers also keeps an unsaved `original_inv_freq` copy (for dynamic RoPE), which the native one has not
    b1 = {k: b for k, b in loaded.model.named_buffers() if "original_inv_freq" not in k}
    b2 = {k: b for k, b in ref.named_buffers() if "original_inv_freq" not in k}
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert loaded.choices.weights["bytes"] > 0
    imported = "import_model" if impl == "native" else "import_transformers"
    for phase in ("import_torch", imported, "read_weights", "load_weights", "processor"):
        assert phase in loaded.choices.timings, phase
    # the image-only GLM-4.1V processor: the native one, or transformers' on the PIL backend here
    assert type(loaded.processor.image_processor).__name__ in ("NativeImageProcessor", "Glm4vImageProcessorPil",
                                                               "Glm4vImageProcessor")
    assert loaded.processor.video_processor is None


@pytest.mark.parametrize("settings,quant,want", [
    ({}, "none", "native"),
    ({}, "fp8", "native"),
    ({}, "nf4", "native"),
    ({}, "int8", "transformers"),
    ({"GPUS_PER_POD": "2"}, "none", "transformers"),
    ({"MODEL_IMPL": "transformers"}, "none", "transformers"),
    ({"MODEL_IMPL": "native"}, "fp8", "native"),
])
def test_model_impl_picks_native_where_it_serves(model_cache_dir, settings, quant, want):
    cfg = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), **settings})
    impl, why = loader.model_impl(cfg, Path(cfg.tiny_model_dir), quant)
    assert impl == want, why
    assert why


def test_model_impl_native_refuses_what_it_cannot_serve(model_cache_dir, tmp_path):
    cfg = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MODEL_IMPL": "native"})
    with pytest.raises(RuntimeError, match="QUANTIZATION=int8"):
        loader.model_impl(cfg, Path(cfg.tiny_model_dir), "int8")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(RuntimeError, match="llama"):
        loader.model_impl(cfg, tmp_path, "none")
    auto = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)})
    assert loader.model_impl(auto, tmp_path, "none")[0] == "transformers"


def test_generation_defaults_read_without_transformers_equal_transformers(model_cache_dir, tmp_path):
    """The sampling defaults and end ids the native path reads from generation_config.json are what transformers'
    GenerationConfig gives (protocol.generation_defaults of either), also for a file that spells out a default."""
    import json

    from transformers import GenerationConfig

    from function.engine.protocol import generation_defaults

    cfg = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)})
    tiny = Path(cfg.tiny_model_dir)
    raw = json.loads((tiny / "generation_config.json").read_text())
    spelled = tmp_path / "spelled"
    spelled.mkdir()
    (spelled / "generation_config.json").write_text(json.dumps({**raw, "temperature": 1.0, "top_p": 0.9}))
    for d in (tiny, spelled):
        ours, theirs = loader.GenerationDefaults.from_dir(d), GenerationConfig.from_pretrained(d)
        assert generation_defaults(ours) == generation_defaults(theirs) != {}
        assert ours.eos_token_id == theirs.eos_token_id
    assert loader.GenerationDefaults.from_dir(tmp_path).eos_token_id is None    # no file: no defaults


def test_after_ready_work_waits_until_the_first_requests_are_answered(model_cache_dir, monkeypatch):
    """After a scale from zero the activator forwards the requests it held the moment readiness passes: the
    full-size warm-up that readiness does not wait for starts only once the engine has been quiet, so those
    requests never queue behind it."""
    import asyncio
    import threading
    import time

    from function.engine import client as client_mod
    from function.engine.client import LocalEngine
    from function.engine.protocol import ChatInput, SamplingParams

    monkeypatch.setattr(client_mod, "AFTER_READY_QUIET_S", 0.3, raising=False)
    answered = threading.Event()
    seen: list[tuple] = []
    real_rest = LocalEngine._warmup_rest

    def warmup_rest(self):
        seen.append((answered.is_set(), self.idle(), self._pending))
        real_rest(self)
    monkeypatch.setattr(LocalEngine, "_warmup_rest", warmup_rest)

    e = LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "2",
                                     "MAX_MODEL_LEN": "1024"}))
    e.start_loading()
    try:
        wait_ready(e)
        deadline = time.monotonic() + 300

        async def first_request():
            n = 0
            async for chunk in e.generate("first", ChatInput(messages=[{"role": "user", "content": "open settings"}]),
                                          SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)):
                n += len(chunk.token_ids)
            return n
        assert asyncio.run(first_request()) == 24
        answered.set()
        while "warmup_after_ready" not in e.timings:
            assert time.monotonic() < deadline, "the warm-up after ready never ran"
            time.sleep(0.02)
        assert seen == [(True, True, 0)]
    finally:
        e.shutdown()


def test_loader_idle_work_runs_a_step_at_a_time_on_the_engine_thread_when_quiet(model_cache_dir, monkeypatch):
    """The loader's idle work (fp8's kernel compiles) runs after ready, on the engine thread (no launch beside a
    graph capture), never while a request is in the engine, and its steps' seconds become its phase."""
    import asyncio
    import threading
    import time

    from function.engine import client as client_mod
    from function.engine import loader
    from function.engine.client import LocalEngine
    from function.engine.protocol import ChatInput, SamplingParams

    monkeypatch.setattr(client_mod, "AFTER_READY_QUIET_S", 0.3)
    steps_seen: list[tuple] = []
    holder: dict = {}

    def steps():
        for i in range(3):
            e = holder["engine"]
            steps_seen.append((threading.current_thread().name, e.idle(), e._pending))
            time.sleep(0.05)
            yield
    real_load = loader.load

    def load(*a, **kw):
        got = real_load(*a, **kw)
        got.idle_work = [("test_idle_work", steps())]
        return got
    monkeypatch.setattr(loader, "load", load)
    e = LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "2",
                                     "MAX_MODEL_LEN": "1024", "WARMUP": "false"}))
    holder["engine"] = e
    e.start_loading()
    try:
        wait_ready(e)
        assert steps_seen == []     # ready did not wait for it

        async def request():
            n = 0
            async for chunk in e.generate("r", ChatInput(messages=[{"role": "user", "content": "open settings"}]),
                                          SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)):
                n += len(chunk.token_ids)
            return n
        assert asyncio.run(request()) == 16
        deadline = time.monotonic() + 60
        while "test_idle_work" not in e.timings:
            assert time.monotonic() < deadline, "the idle work never finished"
            time.sleep(0.02)
        engine_thread = e._core.call(lambda: threading.current_thread().name).result()
        assert steps_seen == [(engine_thread, True, 0)] * 3 and engine_thread != threading.current_thread().name
        assert 0.1 <= e.timings["test_idle_work"] < 30
    finally:
        e.shutdown()
