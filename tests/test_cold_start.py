"""Cold start: what the serving path imports, the safetensors read-ahead, and the loader built on it (CPU, tiny
model). Timings are measured by bench/cold_bench.py, not asserted here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def test_serving_path_leaves_optional_heavy_packages_unimported(tmp_path, model_cache_dir):
    """With scikit-learn and pandas 'installed' (fake packages transformers detects), the whole load of the tiny
    model and the engine's modules import neither. (torch._dynamo and sympy do come in: transformers' modeling
    modules import them unconditionally, through masking_utils and torch.distributed.tensor; torchvision, where
    installed, through transformers.image_utils.)"""
    fakes = tmp_path / "site"
    fake_package(fakes, "sklearn", "scikit-learn")
    fake_package(fakes, "pandas", "pandas")
    got = run_json(f"""
        import json, sys
        from transformers.utils import is_pandas_available, is_sklearn_available
        from function.config import Config
        from function.engine import loader
        loaded = loader.load(Config.from_env({{"MODEL_CACHE_DIR": {str(model_cache_dir)!r}}}))
        import function.engine.core, function.engine.runner, function.engine.inputs, function.engine.kv_cache
        print(json.dumps({{"detected": [is_sklearn_available(), is_pandas_available()],
                           "imported": sorted(m for m in ("sklearn", "pandas") if m in sys.modules),
                           "model": type(loaded.model).__name__, "weights": loaded.choices.weights}}))
    """, env_path=[fakes])
    assert got["detected"] == [True, True]          # the check could fail: transformers sees both
    assert got["imported"] == []
    assert got["model"] == "Glm4vForConditionalGeneration"
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


def test_weight_reader_reports_a_truncated_shard(tmp_path):
    _odd_checkpoint(tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(OSError, match="end of file"):
        WeightReader(tmp_path, "cpu", chunk_bytes=256).start().result()


def test_loader_reads_ahead_and_matches_from_pretrained(model_cache_dir):
    """The model assembled from the read-ahead tensors equals transformers' own load of the same directory,
    parameters and buffers; the phases are timed."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vForConditionalGeneration

    cfg = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)})
    loaded = loader.load(cfg)
    ref = Glm4vForConditionalGeneration.from_pretrained(cfg.tiny_model_dir, dtype=torch.float32)
    ours, theirs = loaded.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    b1, b2 = dict(loaded.model.named_buffers()), dict(ref.named_buffers())
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert loaded.choices.weights["bytes"] > 0
    for phase in ("import_torch", "import_transformers", "read_weights", "load_weights", "processor"):
        assert phase in loaded.choices.timings, phase
    # the processor is the image-only GLM-4.1V one on the PIL backend, whatever is installed
    assert type(loaded.processor.image_processor).__name__ in ("Glm4vImageProcessorPil", "Glm4vImageProcessor")
    assert loaded.processor.video_processor is None
