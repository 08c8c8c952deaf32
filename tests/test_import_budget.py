"""What the server's start imports (issue 17: the import of torch + transformers is most of a cold start): the
packages transformers would import only for what this server never runs (loader.OPTIONAL_TO_TRANSFORMERS: scipy
for its object-detection losses, scikit-learn for assisted generation) stay unimported through the engine's whole
start, in fresh processes, while they still import normally afterwards. Functional checks, not timings (those are
bench/import_probe.py's).

What still comes in, and only a model and processor path that does not import transformers' modeling modules
would avoid (transformers.processing_utils imports modeling_utils too): torch._dynamo (transformers.masking_utils)
and torch.distributed.tensor (its sharding helpers: activations -> hub_kernels -> core_model_loading), sympy under
both, accelerate, and torchvision where installed (transformers.image_utils)."""
from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

from support.subproc import fake_package, run_json
from function.config import Config
from function.engine import loader

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = list(loader.OPTIONAL_TO_TRANSFORMERS)




@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """scikit-learn 'installed' (a fake transformers detects) beside the real scipy of the test venv."""
    root = tmp_path_factory.mktemp("site")
    if importlib.util.find_spec("sklearn") is None:
        fake_package(root, "sklearn", "scikit-learn")
    return root


ABSENT = "function_import_budget_absent_pkg"


def test_hidden_packages_come_back_and_imported_ones_are_left_alone(monkeypatch):
    name = ABSENT
    # as if this process's transformers had been first imported without both (other tests may have imported it)
    monkeypatch.setattr(loader, "_hidden_at_first_import", (name, "json"))
    assert "json" in sys.modules
    json_mod = sys.modules["json"]
    with loader.hidden_from_transformers((name, "json")) as hidden:
        assert hidden == [name]                   # json is imported: hiding it would break its users
        assert importlib.util.find_spec(name) is None
        with pytest.raises(ImportError):
            __import__(name)
        assert sys.modules["json"] is json_mod
    assert name not in sys.modules               # no None left behind: the package imports as usual again
    with pytest.raises(ModuleNotFoundError, match=name):
        __import__(name)                          # (it does not exist: the ordinary error, not the blocked one)


def test_an_import_that_wants_a_hidden_package_runs_again_without_hiding(monkeypatch, caplog):
    monkeypatch.setattr(loader, "_hidden_at_first_import", (ABSENT,))
    seen = []

    def fn():
        seen.append(sys.modules.get(ABSENT, "absent"))
        if len(seen) == 1:
            __import__(ABSENT)             # hidden: ImportError, as transformers' import would raise
        return "imported"

    assert loader.with_hidden_from_transformers(fn, (ABSENT,)) == "imported"
    assert seen == [None, "absent"]       # the second run saw nothing hidden
    assert "importing it with them" in caplog.text
    with pytest.raises(ImportError):      # an ImportError of anything else is the caller's
        loader.with_hidden_from_transformers(lambda: __import__(ABSENT + "_other"), (ABSENT,))


def test_start_up_imports_leave_optional_packages_unimported(tiny_dir, site):
    """loader.import_transformers, what load() runs before from_pretrained, then the engine's modules. A control
    run of the same imports without the block shows that the check can fail: transformers does import scipy."""
    heavy = OPTIONAL + ["torch._dynamo", "sympy", "torch.distributed.tensor", "torchvision", "accelerate"]
    got = run_json(f"""
        import importlib.util, json, sys
        from pathlib import Path
        import torch
        from function.engine import loader
        cfg, model = loader.import_transformers(Path({str(tiny_dir)!r}))
        import function.engine.core, function.engine.runner, function.engine.inputs, function.engine.kv_cache
        import function.engine.sampling, function.engine.scheduler, function.engine.detokenizer
        imported = [m for m in {heavy!r} if sys.modules.get(m) is not None]
        blocked = [m for m, v in sys.modules.items() if v is None and m.split(".")[0] in {OPTIONAL!r}]
        findable = [m for m in {OPTIONAL!r} if importlib.util.find_spec(m) is not None]
        import scipy.signal   # audio.py's resampler: imports once the block is over
        print(json.dumps({{"imported": imported, "blocked": blocked, "findable": findable,
                           "classes": [cfg.__name__, model.__name__], "scipy_after": "scipy.signal" in sys.modules}}))
    """, env_path=[site])
    assert got["classes"] == ["Glm4vConfig", "Glm4vForConditionalGeneration"]
    assert not set(OPTIONAL) & set(got["imported"]), got["imported"]
    assert got["blocked"] == []
    assert sorted(got["findable"]) == sorted(OPTIONAL)     # still installed, for everyone else
    assert got["scipy_after"]

    control = run_json(f"""
        import json, sys
        from pathlib import Path
        import torch
        from function.engine import loader
        loader.model_classes(Path({str(tiny_dir)!r}))
        print(json.dumps([m for m in {OPTIONAL!r} if sys.modules.get(m) is not None]))
    """, env_path=[site])
    assert "scipy" in control


@pytest.mark.parametrize("before", ["import transformers",
                                    # a block imported transformers, then a check answered "installed" outside one
                                    "with loader.hidden_from_transformers():\n    import transformers\n"
                                    "from transformers.utils import is_scipy_available\n"
                                    "is_scipy_available.cache_clear(); assert is_scipy_available()"])
def test_transformers_that_may_think_them_installed_still_imports(tiny_dir, before):
    """transformers imported before the start's block (its availability checks answered with scipy visible)
    must not fail to import the model: the block hides nothing it was not first imported without, and an import
    that wants a hidden package after all is done again without hiding. The model then loads."""
    got = run_json(f"""
        import json, sys
        from pathlib import Path
        import torch
        from function.engine import loader
        {textwrap.indent(before, " " * 8).lstrip()}
        cfg, model_cls = loader.import_transformers(Path({str(tiny_dir)!r}))
        model = model_cls.from_pretrained({str(tiny_dir)!r})
        print(json.dumps({{"model": type(model).__name__, "scipy": sys.modules.get("scipy") is not None,
                           "blocked": [m for m, v in sys.modules.items() if v is None and m in {OPTIONAL!r}]}}))
    """)
    assert got == {"model": "Glm4vForConditionalGeneration", "scipy": True, "blocked": []}


def test_engine_start_to_ready_leaves_optional_packages_unimported(tiny_dir, site, tmp_path):
    """The server's engine (LocalEngine: loader.load, KV cache, warm-up) to ready and one greedy request, in a
    fresh process: no optional package came in along the way, and the engine serves."""
    got = run_json(f"""
        import asyncio, json, sys, time
        from function.config import Config
        from function.engine.client import LocalEngine
        from function.engine.protocol import ChatInput, SamplingParams
        e = LocalEngine(Config.from_env({{"MODEL_PATH": {str(tiny_dir)!r}, "MODEL_CACHE_DIR": {str(tmp_path)!r},
                                         "MAX_NUM_SEQS": "2", "MAX_MODEL_LEN": "1024"}}))
        e.start_loading()
        deadline = time.monotonic() + 240
        while not e.status()[1]:
            assert e.error is None and time.monotonic() < deadline, e.status()
            time.sleep(0.05)
        imported = [m for m in {OPTIONAL!r} if sys.modules.get(m) is not None]

        async def one():
            chat = ChatInput(messages=[{{"role": "user", "content": [{{"type": "text", "text": "hi"}}]}}])
            n, greedy = 0, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            async for chunk in e.generate("budget", chat, greedy):
                n += len(chunk.token_ids)
            return n
        n = asyncio.run(one())
        e.shutdown()
        print(json.dumps({{"imported": imported, "tokens": n, "timings": e.timings}}))
    """, env_path=[site])
    assert got["imported"] == [], got
    assert got["tokens"] == 4
    assert got["timings"]["import"] > 0
