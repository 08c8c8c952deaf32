"""Loading the checkpoint with transformers' own classes: device, dtype, attention and quantization choices, and
the pre-quantized copy on the model cache volume that lets later cold starts skip quantization.

Works the same for the real AutoGLM-Phone-9B directory and the embedded tiny model.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import Config

log = logging.getLogger(__name__)

PREQUANT_FORMAT = 1  # bump when the pre-quantized layout changes
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "generation_config.json", "tokenizer.model")


@dataclass
class Choices:
    """What the loader decided, logged once and exported as metric labels."""
    model_path: str
    device: str
    dtype: str
    quantization: str
    attn_implementation: str
    source: str = ""            # "checkpoint" | "prequantized-cache" | "tiny"
    reason: str = ""            # why this quantization (QUANTIZATION=auto's rule: fp8.choose_auto)
    timings: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)    # read-ahead: bytes, read_s, gbps (empty: not used)
    model_impl: str = "transformers"   # "native" (engine/glm4v.py, glm4v_processing.py) | "transformers"
    model_impl_reason: str = ""

    def labels(self) -> dict[str, str]:
        return {"model_path": self.model_path, "device": self.device, "dtype": self.dtype,
                "quantization": self.quantization, "attn_implementation": self.attn_implementation,
                "source": self.source, "model_impl": self.model_impl}


def resolve_model_path(config: Config, on_phase: Callable[[str], None] = lambda p: None) -> tuple[Path, str]:
    """The checkpoint directory: MODEL_PATH, or the tiny model built once into the cache dir."""
    if config.model_path:
        p = Path(config.model_path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"MODEL_PATH={config.model_path!r} has no config.json: point MODEL_PATH at a "
                                    "local checkpoint directory (downloads are disabled; fill the model cache volume "
                                    "with the pre-quantize Job first)")
        return p, "checkpoint"
    from ..tiny_model import build_tiny_model, is_built
    on_phase("reusing the tiny model" if is_built(config.tiny_model_dir) else "building tiny model")
    return Path(build_tiny_model(config.tiny_model_dir)), "tiny"


def choose(config: Config, model_path: Path) -> Choices:
    import torch

    if config.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = config.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"DEVICE={device} but no CUDA device is visible (check the GPU limit and the "
                               "NVIDIA runtime on the node)")
    if config.require_gpu and not device.startswith("cuda"):
        raise RuntimeError("REQUIRE_GPU is set but no CUDA device is visible: give the pod an nvidia.com/gpu limit "
                           "on a GPU node (NVIDIA device plugin installed), or unset REQUIRE_GPU to serve on CPU")
    if config.dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    else:
        dtype = config.dtype
    quant = config.quantization
    reason = f"QUANTIZATION={quant}"
    if quant == "auto":
        from . import fp8
        # reads the checkpoint with loader.model_config: natively for GLM-4.1V, else with the optional packages hidden
        quant, reason = fp8.choose_auto(config, model_path, device)
        reason = f"QUANTIZATION=auto chose {quant}: {reason}"
    if quant == "bf16":
        quant = "none"
    log.info("quantization %s (%s)", quant, reason)
    if quant == "fp8" and not device.startswith("cuda"):
        log.warning("QUANTIZATION=fp8 on %s: the FP8 arithmetic is emulated in fp32 (same numerics, no speed-up)",
                    device)
    if quant in ("nf4", "int8"):
        if not device.startswith("cuda"):
            raise RuntimeError(f"QUANTIZATION={quant} needs a CUDA device (bitsandbytes); use QUANTIZATION=none "
                               "on CPU")
        if importlib.util.find_spec("bitsandbytes") is None:   # imported later, by the quantizer itself
            raise RuntimeError(f"QUANTIZATION={quant} needs the bitsandbytes package, which is not installed")
    attn = config.attn_implementation
    if attn == "auto":
        attn = "sdpa"
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
            try:
                import flash_attn  # noqa: F401
                attn = "flash_attention_2"
            except ImportError:
                pass
    return Choices(model_path=str(model_path), device=device, dtype=dtype, quantization=quant,
                   attn_implementation=attn, reason=reason)


def model_impl(config: Config, model_path: Path, quantization: str) -> tuple[str, str]:
    """("native" | "transformers", why): which implementation serves (MODEL_IMPL, vLLM's --model-impl). The native
    one (engine/glm4v.py and glm4v_processing.py, torch and tokenizers only) is what makes a cold start short:
    importing transformers' GLM-4.1V modules costs 4-10 s on the GPU image (bench/RESULTS.md). It covers GLM-4.1V
    in bf16, fp8 and nf4 (engine/fp8.py, engine/nf4.py) on one device; int8 quantizes inside transformers'
    from_pretrained (bitsandbytes' LLM.int8 modules), and a split over several cards uses transformers' device map,
    so those keep transformers."""
    if config.model_impl == "transformers":
        return "transformers", "MODEL_IMPL=transformers"
    kind = _model_type(model_path)
    why_not = None
    if kind != "glm4v":
        why_not = f"model_type {kind!r} has no native implementation (only glm4v)"
    elif quantization == "int8":
        why_not = "QUANTIZATION=int8 quantizes through transformers (bitsandbytes)"
    elif config.gpus_per_pod > 1:
        why_not = f"GPUS_PER_POD={config.gpus_per_pod} places the model with transformers' device map"
    if why_not is None:
        return "native", f"MODEL_IMPL={config.model_impl}: GLM-4.1V, {quantization}, one device"
    if config.model_impl == "native":
        raise RuntimeError(f"MODEL_IMPL=native cannot serve this: {why_not}; use MODEL_IMPL=auto or transformers")
    return "transformers", f"MODEL_IMPL=auto: {why_not}"


def model_config(model_path: Path):
    """The checkpoint's config for sizing (QUANTIZATION=auto, placement): the native parse of config.json for
    GLM-4.1V (no transformers import), AutoConfig for anything else."""
    if _model_type(model_path) == "glm4v":
        from .glm4v import Glm4vNativeConfig
        return Glm4vNativeConfig.from_dir(model_path)
    from transformers import AutoConfig
    return with_hidden_from_transformers(lambda: AutoConfig.from_pretrained(model_path))


class GenerationDefaults(dict):
    """generation_config.json as read without transformers: its keys as a dict (protocol.generation_defaults reads
    them as vLLM's --generation-config auto does) and `eos_token_id` as an attribute, as GenerationConfig has it.
    Every value the file sets counts, as transformers 5's `to_diff_dict` (its defaults are unset) counts them."""

    @classmethod
    def from_dir(cls, model_path: Path) -> "GenerationDefaults":
        f = Path(model_path) / "generation_config.json"
        if not f.is_file():
            return cls()
        return cls(json.loads(f.read_text()))

    @property
    def eos_token_id(self):
        return self.get("eos_token_id")


def bnb_config(quant: str, quantize_vision: bool, dtype):
    """BitsAndBytesConfig. `llm_int8_skip_modules` replaces transformers' defaults, so lm_head is listed here;
    the vision tower stays in bf16 unless QUANTIZE_VISION is set (it is small and accuracy-sensitive)."""
    from transformers import BitsAndBytesConfig

    from .nf4 import skip_modules

    skip = skip_modules(quantize_vision)
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _checkpoint_fingerprint(model_path: Path, choices: Choices, quantize_vision: bool) -> str:
    """Identifies (checkpoint contents, quantization settings, library versions) cheaply: file names, sizes and
    mtimes, not contents (hashing 20 GB would cost more than quantizing)."""
    tf_v, bnb_v = _version("transformers"), _version("bitsandbytes")
    h = hashlib.sha256()
    for p in sorted(model_path.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(f"{choices.quantization}:{choices.dtype}:{quantize_vision}:{tf_v}:{bnb_v}:"
             f"{PREQUANT_FORMAT}".encode())
    return h.hexdigest()[:16]


def _version(dist: str) -> str:
    """An installed package's version from its metadata (importing bitsandbytes or transformers for it would put
    seconds on the start's critical path); "none" where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def prequantized_dir(config: Config, model_path: Path, choices: Choices) -> Path:
    fp = _checkpoint_fingerprint(model_path, choices, config.quantize_vision)
    return Path(config.model_cache_dir) / "prequantized" / f"{model_path.name}-{choices.quantization}-{fp}"


def _complete(d: Path) -> bool:
    return (d / "prequantized.json").is_file()


def save_prequantized(model, model_path: Path, out: Path) -> None:
    """Write the quantized weights plus the processor files, atomically (temp dir + rename), so a crash or a
    concurrent pod never leaves a half-written checkpoint that later starts would trust."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from . import fp8, nf4
    if fp8.converted_modules(model):
        fp8.save_model(model, tmp)
    elif nf4.quantized(model) and not hasattr(model, "save_pretrained"):   # the native nf4 model
        nf4.save_model(model, tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    for name in PROCESSOR_FILES:
        src = model_path / name
        if src.is_file():
            shutil.copy2(src, tmp / name)
    (tmp / "prequantized.json").write_text(json.dumps({"from": str(model_path), "format": PREQUANT_FORMAT,
                                                       "written": time.time()}))
    try:
        os.replace(tmp, out)
    except OSError:  # another pod won the race: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def _model_type(model_dir: Path) -> str:
    try:
        return str(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


# Packages transformers imports at module level when they are installed, for what this server never runs: scipy
# for the object-detection losses (transformers.loss, imported by modeling_utils) and scikit-learn for assisted
# generation's ROC heuristic (generation.candidate_generator, at import in transformers 5.17, lazily in 5.24).
# scipy.optimize is ~0.2 s of the start's import on this CPU; scikit-learn was 1.4 s on the H200 image (which has
# it; the product image does not install it).
OPTIONAL_TO_TRANSFORMERS = ("scipy", "sklearn")
_hidden_at_first_import: tuple[str, ...] = ()    # what transformers was first imported without, in this process


@contextlib.contextmanager
def hidden_from_transformers(names: tuple[str, ...] = OPTIONAL_TO_TRANSFORMERS):
    """The packages `names` look absent while the block imports transformers, as on an image without them: a None
    in sys.modules makes `importlib.util.find_spec` (transformers' is_*_available) answer None and an import of
    them raise ImportError. transformers caches those answers, so it keeps treating them as absent; the packages
    import as usual for everyone else once the block ends (function/audio.py's scipy resampling). Left alone: a
    package already imported (the speech model imports transformers first, with them), and, once transformers is
    imported, any package it was not first imported without (its cached answer may say "installed", and hiding
    the package then would break its import)."""
    global _hidden_at_first_import
    first = "transformers" not in sys.modules
    hidden = [n for n in names if n not in sys.modules and (first or n in _hidden_at_first_import)]
    if first:
        _hidden_at_first_import = tuple(hidden)
    for n in hidden:
        sys.modules[n] = None
    try:
        yield hidden
    finally:
        for n in hidden:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]


def import_transformers(model_dir: Path, hide: tuple[str, ...] = OPTIONAL_TO_TRANSFORMERS):
    """What the start imports of transformers before it builds the model, with the packages `hide` hidden from it
    (`hidden_from_transformers`): (config class, model class) from `model_classes`, and on the same thread what
    the processor thread uses (two threads importing one package's modules can deadlock): the tokenizer and
    generation config classes, Glm4vProcessor and the image processor class it serves. Measured by
    bench/import_probe.py; tests/test_import_budget.py checks what it leaves out."""
    def _import():
        classes = model_classes(model_dir)
        from transformers import AutoTokenizer, GenerationConfig  # noqa: F401
        if _model_type(model_dir) == "glm4v":
            from transformers.models.glm4v import processing_glm4v  # noqa: F401
            image_processor_class()
        return classes

    return with_hidden_from_transformers(_import, hide)


def with_hidden_from_transformers(fn: Callable[[], Any], hide: tuple[str, ...] = OPTIONAL_TO_TRANSFORMERS):
    """fn() under `hidden_from_transformers(hide)`; should its imports want a hidden package after all (an
    availability check answered between two blocks), fn() once more without hiding."""
    try:
        with hidden_from_transformers(hide) as hidden:
            return fn()
    except ImportError as e:
        if (e.name or "").split(".")[0] not in hidden:
            raise
        log.warning("importing transformers without %s failed (%s); importing it with them", ", ".join(hidden), e)
        return fn()


def model_classes(model_dir: Path):
    """(config class, model class). For GLM-4.1V (AutoGLM-Phone-9B, the tiny model) its own modules, imported
    directly: the Auto classes' import graph and name mapping cost start-up time and buy nothing for one known
    architecture. Any other checkpoint goes through the Auto classes."""
    if _model_type(model_dir) == "glm4v":
        from transformers.models.glm4v.configuration_glm4v import Glm4vConfig
        from transformers.models.glm4v.modeling_glm4v import Glm4vForConditionalGeneration
        return Glm4vConfig, Glm4vForConditionalGeneration
    from transformers import AutoConfig, AutoModelForImageTextToText
    return AutoConfig, AutoModelForImageTextToText


def image_processor_class():
    """GLM-4.1V's image processor: transformers' torchvision backend where torchvision imports, else its PIL
    backend. Both implement the same preprocessing (smart resize to a multiple of 28, rescale, normalize,
    14x14 patches); the torchvision one runs it as tensor ops, and a 1080x2400 screenshot is most of a turn's
    preparation time: ~0.3 s with PIL/numpy on the H200 host vs ~0.04 s (bench/prefill_probe.py), i.e. more than
    the prefill itself. The product image installs torchvision beside torch (Dockerfile); the CPU test venv has
    none and tests the PIL backend."""
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        try:
            from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor as Fast
            from transformers.image_processing_backends import TorchvisionBackend
            if issubclass(Fast, TorchvisionBackend):
                return Fast
        except ImportError:     # transformers before the backend split: the torchvision class is the "fast" one
            try:
                from transformers.models.glm4v.image_processing_glm4v_fast import Glm4vImageProcessorFast
                return Glm4vImageProcessorFast
            except ImportError:
                pass
    try:
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
        return Glm4vImageProcessorPil
    except ImportError:     # transformers before the backend split: the slow class is the PIL one
        from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
        return Glm4vImageProcessor


def load_processor(model_path: Path, impl: str = "transformers"):
    """Glm4vProcessor from its tokenizer, its image processor (`image_processor_class`) and the chat template,
    without a video processor: the API takes no video, and transformers' video processor would make the processor
    depend on torchvision. The native implementation (`impl="native"`) is glm4v_processing's, which imports no
    transformers. Checkpoints of another architecture go through AutoProcessor."""
    if impl == "native":
        from .glm4v_processing import NativeGlm4vProcessor
        return NativeGlm4vProcessor.from_dir(model_path)
    if _model_type(model_path) != "glm4v":
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(model_path)
    from transformers import AutoTokenizer
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    ImageProcessor = image_processor_class()

    tok = AutoTokenizer.from_pretrained(model_path)
    template = None
    if (model_path / "chat_template.jinja").is_file():
        template = (model_path / "chat_template.jinja").read_text()

    class ImageOnlyGlm4vProcessor(Glm4vProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def __call__(self, *args, videos=None, **kwargs):
            if videos is not None:
                raise ValueError("video input is not served (Glm4vProcessor without its video processor)")
            return super().__call__(*args, **kwargs)

    return ImageOnlyGlm4vProcessor(image_processor=ImageProcessor.from_pretrained(model_path), tokenizer=tok,
                                   video_processor=None, chat_template=template or tok.chat_template)


def prefetch_weights(config: Config, model_path: Path) -> None:
    """Ask the kernel to start reading the weight files into the page cache now, while Python imports torch and
    transformers (10-20 s on a GPU image): on a network volume the first read is what makes a cold start slow."""
    if not hasattr(os, "posix_fadvise"):
        return
    quant = config.quantization   # auto: decided after torch imports (fp8.choose_auto); any pre-quantized copy
    dirs = [model_path]
    if quant not in ("none", "bf16") and config.prequantized_cache:
        pattern = f"{model_path.name}-{'*' if quant == 'auto' else quant}-*/prequantized.json"
        done = sorted((Path(config.model_cache_dir) / "prequantized").glob(pattern),
                      key=lambda p: p.stat().st_mtime)
        if done:
            dirs = [done[-1].parent]
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass


@dataclass
class Loaded:
    model: Any
    processor: Any
    tokenizer: Any
    generation_config: Any
    choices: Choices
    placement: Any = None      # placement.Placement when the model is split over several GPUs
    # load(defer_save=True) on a start that quantized: writes the pre-quantized copy (the caller runs it once the
    # server is ready, so the first start does not wait for the write); None when there is nothing to write
    save_prequantized: Callable[[], float | None] | None = None
    # (phase, steps): start-up work readiness does not wait for, run a step at a time on the engine thread while no
    # request is in the engine (each step a fraction of a second); the phase's seconds are the steps' own
    idle_work: list[tuple[str, Iterator[None]]] = field(default_factory=list)


def quantization_kwargs(config: Config, choices: Choices, dtype) -> dict:
    """The from_pretrained arguments that quantize a full-precision checkpoint while it loads (one branch per
    QUANTIZATION method); {} for none. A pre-quantized checkpoint needs none: its config carries the method."""
    if choices.quantization in ("nf4", "int8"):
        return {"quantization_config": bnb_config(choices.quantization, config.quantize_vision, dtype)}
    return {}


def _process_age_s() -> float | None:
    """Seconds since this process was exec'd (from /proc), so the log can say exec -> phase; None where unknown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def _preload_eligible(config: Config, choices: Choices, quantize_now: bool, load_dir: Path) -> str | None:
    """Why the weights are not read ahead (None: they are). Reading ahead holds the whole checkpoint in memory
    before from_pretrained consumes it: fine on the GPU (checked against free memory by the reader), not for a
    checkpoint that bitsandbytes quantizes while it loads (its full-precision copy would not fit where the
    quantized one does), a model split over several cards, or a large checkpoint on CPU (it would sit in RAM
    twice). A first fp8 start, and a first nf4 start on the native model, read ahead: they quantize the loaded bf16
    model (on a card without room for it, the reader declines and nf4 loads it on the CPU, quantizing each layer onto
    the card)."""
    from . import weights

    if quantize_now and not (choices.quantization == "fp8" or
                             (choices.quantization == "nf4" and choices.model_impl == "native")):
        return "quantized while loading"
    if choices.quantization == "fp8" and not quantize_now and choices.model_impl != "native":
        return "the fp8 copy is read by fp8.load_model"
    if config.gpus_per_pod > 1:
        return "split over several GPUs"
    files = weights.shard_files(load_dir)
    if not files:
        return "no safetensors shards"
    if not choices.device.startswith("cuda") and weights.checkpoint_bytes(load_dir) > 2 << 30:
        return "large checkpoint on CPU"
    return None


def load(config: Config, on_phase: Callable[[str], None] = lambda p: None, defer_save: bool = False) -> Loaded:
    """Load model + processor. Phases are reported through `on_phase` and timed in `choices.timings`.
    `defer_save`: a start that quantized returns the write of the pre-quantized copy as
    `Loaded.save_prequantized` instead of doing it before returning (the server writes it after ready).

    What overlaps (a cold start is mostly waiting on imports): after `import torch`, a reader thread creates the
    CUDA context and reads the safetensors shards into device memory (weights.WeightReader) while this thread
    imports transformers' GLM-4.1V modules and loads the processor; from_pretrained then takes the tensors that are
    already on the device. `import`, `processor` and `read_weights` overlap, so the phases add up to more than
    the wall time; `weights_wait` is how long this thread waited for the reader."""
    timings: dict[str, float] = {}

    def timed(phase, fn):
        on_phase(phase)
        t = time.perf_counter()
        r = fn()
        timings[phase] = round(time.perf_counter() - t, 3)
        return r

    age = _process_age_s()
    if age is not None:
        timings["exec_to_load_start"] = age
    model_path, source = resolve_model_path(config, on_phase)
    prefetch_weights(config, model_path)
    torch = timed("import_torch", lambda: importlib.import_module("torch"))
    choices = choose(config, model_path)
    choices.source = source
    on_phase(f"quantization {choices.quantization} ({choices.reason})")
    load_dir, cache_dir = model_path, None
    if choices.quantization != "none":
        cache_dir = prequantized_dir(config, model_path, choices)
        if config.prequantized_cache and _complete(cache_dir):
            load_dir, choices.source = cache_dir, "prequantized-cache"
    quantize_now = choices.quantization != "none" and load_dir == model_path
    impl, choices.model_impl_reason = model_impl(config, model_path, choices.quantization)
    choices.model_impl = impl
    native = impl == "native"
    log.info("model implementation %s (%s)", impl, choices.model_impl_reason)
    dtype = getattr(torch, choices.dtype)
    cuda = choices.device.startswith("cuda")
    if cuda:
        from .placement import check_devices

        check_devices(config.gpus_per_pod, torch.cuda.device_count(), device=config.device,
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))

    from .weights import WeightReader

    reader = None
    why_not = _preload_eligible(config, choices, quantize_now, load_dir)
    if why_not is None:
        reader = WeightReader(load_dir, choices.device).start()     # CUDA init + reading, beside the imports
    else:
        log.info("weights are read by from_pretrained (%s)", why_not)
    cuda_init = None
    if cuda and reader is None:
        cuda_init = _Background(lambda: torch.zeros(1, device=choices.device))
    # fp8: the card's probes (a small _scaled_mm, the Triton kernels: ~1.2 s with a warm Triton cache) beside the
    # weight read, the imports and the model build; the conversion or fp8.load_model asks for the answer last
    fp8_probe = _start_fp8_probe(choices) if _fp8_probe_beside(choices) else None
    # nf4 on the native model: bitsandbytes' import beside the weight read
    bnb_import = None
    if native and choices.quantization == "nf4":
        from . import nf4
        bnb_import = _Background(nf4.import_bitsandbytes)

    def fp8_support():
        """The background probe's Support, or None (fp8 then probes on this thread), with the reason logged."""
        if fp8_probe is None:
            return None
        t = time.perf_counter()
        try:
            support = fp8_probe.result()
        except Exception as e:  # noqa: BLE001 - probing again on this thread says what is wrong, or works
            log.warning("fp8: the device probe beside the load failed (%s: %s); probing on this thread",
                        type(e).__name__, e)
            return None
        timings["fp8_probe_wait"] = round(time.perf_counter() - t, 3)
        timings["fp8_probe"] = fp8_probe.seconds
        log.info("fp8: device probes %.2fs beside the load, waited %.2fs (%s)", fp8_probe.seconds,
                 timings["fp8_probe_wait"], support.reason)
        return support

    if native:
        glm4v = timed("import_model", lambda: importlib.import_module(".glm4v", __package__))
        timings["import"] = round(timings["import_torch"] + timings["import_model"], 3)
        if cuda and config.rotary_kernels:
            # the rotary kernels (engine/rope.py): Triton's import and their check on the card, beside the read
            from . import rope
            rope.preload(choices.device, dtype, glm4v.rotary_shapes(glm4v.Glm4vNativeConfig.from_dir(load_dir)))
    else:
        config_cls, model_cls = timed("import_transformers", lambda: import_transformers(model_path))
        timings["import"] = round(timings["import_torch"] + timings["import_transformers"], 3)
    processor_job = _Background(lambda: load_processor(model_path, impl))   # tokenizer files, beside the load

    if cuda_init is not None:
        timed("cuda_init", cuda_init.result)
    placement = None
    device_map = choices.device
    if cuda and config.gpus_per_pod > 1:
        from transformers import AutoConfig

        from .placement import plan, visible_gpu_bytes, weight_bytes_per_param

        itemsize = torch.finfo(dtype).bits // 8
        placement = plan(AutoConfig.from_pretrained(model_path), config.gpus_per_pod, visible_gpu_bytes(),
                         weight_bytes_per_param(choices.quantization, itemsize),
                         max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                         utilization=config.gpu_memory_utilization, dtype_bytes=itemsize,
                         quantize_vision=config.quantize_vision, device=config.device)
        device_map = placement.device_map
        log.info("placement over %d GPUs: %s", config.gpus_per_pod, placement.summary())
    kwargs = quantization_kwargs(config, choices, dtype) if quantize_now else {}
    phase = "load_prequantized" if load_dir != model_path else (
        "load_and_quantize" if choices.quantization != "none" else "load_weights")
    common = dict(dtype=dtype, device_map=device_map, attn_implementation=choices.attn_implementation)

    state = None
    if reader is not None:
        def _wait():
            try:
                return reader.result()
            except Exception as e:  # noqa: BLE001 - from_pretrained reads the files itself and says what is wrong
                log.warning("reading the weights ahead failed (%s: %s)", type(e).__name__, e)
                return None

        state = timed("weights_wait", _wait)
        if reader.stats.get("cuda_init_s") is not None:
            timings["cuda_init"] = reader.stats["cuda_init_s"]
        if state is None and reader.declined:
            log.info("weights are read by from_pretrained (%s)", reader.declined)
        elif state is not None:
            timings["read_weights"] = reader.stats["read_s"]
            choices.weights = dict(reader.stats)
            log.info("read %.2f GB of weights into %s in %.2fs (%.2f GB/s, %d threads)", reader.stats["bytes"] / 1e9,
                     choices.device, reader.stats["read_s"], reader.stats["gbps"], reader.threads)

    def _convert_fp8(model) -> None:
        from . import fp8
        log.info("fp8 conversion: %s", fp8.convert(model, quantize_vision=config.quantize_vision,
                                                   support=fp8_support))

    def _load_native():
        nonlocal state
        from . import fp8
        if choices.quantization == "fp8" and load_dir != model_path:   # the pre-quantized fp8 copy
            return fp8.load_model(load_dir, dtype=dtype, device_map=device_map,
                                  attn_implementation=choices.attn_implementation, native=True, state_dict=state,
                                  support=fp8_support)
        nf4_now = quantize_now and choices.quantization == "nf4"
        if choices.quantization == "nf4":
            from . import nf4
            if bnb_import is not None:
                t = time.perf_counter()
                bnb_import.result()
                timings["bitsandbytes_import_wait"] = round(time.perf_counter() - t, 3)
                timings["bitsandbytes_import"] = bnb_import.seconds
            if not nf4_now:   # the pre-quantized nf4 copy
                return nf4.load_native(load_dir, dtype, choices.device, state_dict=state)
        # a first nf4 start whose bf16 weights were not read onto the card (no room) quantizes from the CPU
        target = "cpu" if nf4_now and state is None else choices.device
        try:
            model = glm4v.load_native(load_dir, dtype, target, state_dict=state)
        except Exception as e:  # noqa: BLE001 - a read-ahead that went wrong: read the files once more
            if state is None:
                raise
            log.warning("loading the weights read ahead failed (%s: %s); reading them again", type(e).__name__, e)
            state = None
            model = glm4v.load_native(load_dir, dtype, target)
        if quantize_now and choices.quantization == "fp8":
            _convert_fp8(model)
        if nf4_now:
            t = time.perf_counter()
            names = nf4.quantize(model, dtype, choices.device, quantize_vision=config.quantize_vision)
            timings["nf4_quantize"] = round(time.perf_counter() - t, 3)
            log.info("nf4: quantized %d linear layers on %s in %.2fs", len(names), choices.device,
                     timings["nf4_quantize"])
        return model.eval()

    def _from_pretrained():
        nonlocal state
        if native:
            try:
                return _load_native()
            except Exception as e:  # noqa: BLE001 - safetensors' own error class derives from Exception only
                if "out of memory" in str(e).lower():
                    raise
                raise _unreadable(e) from e
            finally:
                state = None
                if cuda:
                    torch.cuda.empty_cache()
        if state is not None:
            try:
                cfg = config_cls.from_pretrained(load_dir)
                model = model_cls.from_pretrained(None, config=cfg, state_dict=state, **common, **kwargs)
                model.config._name_or_path = str(load_dir)
                if quantize_now and choices.quantization == "fp8":
                    state = None     # the bf16 tensors go as their modules are converted
                    _convert_fp8(model)
                return model.eval()
            except Exception as e:  # noqa: BLE001 - the plain path below reads the files itself
                log.warning("loading the weights read ahead failed (%s: %s); reading them again with "
                            "from_pretrained", type(e).__name__, e)
            finally:
                state = None
                if cuda:
                    torch.cuda.empty_cache()
        try:
            if choices.quantization == "fp8":
                from . import fp8
                if load_dir != model_path:   # the pre-quantized fp8 copy on the cache volume
                    return fp8.load_model(load_dir, dtype=dtype, device_map=device_map,
                                          attn_implementation=choices.attn_implementation, support=fp8_support)
                m = model_cls.from_pretrained(load_dir, **common).eval()
                _convert_fp8(m)
                return m
            return model_cls.from_pretrained(load_dir, **common, **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - safetensors' own error class derives from Exception only
            if "out of memory" in str(e).lower() or isinstance(e, ImportError):
                raise
            raise _unreadable(e) from e

    def _unreadable(e: Exception) -> RuntimeError:
        fix = ("delete that directory so the next start quantizes again" if load_dir != model_path else
               "re-copy the checkpoint (or re-run the model-cache Job)")
        return RuntimeError(f"the checkpoint in {load_dir} could not be read; it is corrupt or incomplete "
                            f"({type(e).__name__}: {e}); {fix}")

    model = timed(phase, _from_pretrained)
    idle_work = [("fp8_warm_kernels", _fp8_kernel_warmup(config, model))] if choices.quantization == "fp8" else []
    if cuda:
        torch.cuda.empty_cache()    # from_pretrained's allocator warm-up block, where the weights were read ahead
    pending_save = None
    if cache_dir is not None and quantize_now and config.prequantized_cache:
        def pending_save() -> float | None:
            """Write the copy; its seconds (also in choices.timings), or None when it could not be written."""
            t = time.perf_counter()
            stream = contextlib.nullcontext()
            if cuda:   # the copies to the host on a stream of their own, beside the serving engine's work
                side = torch.cuda.Stream(device=model.device)
                side.wait_stream(torch.cuda.default_stream(model.device))   # after the conversion's kernels
                stream = torch.cuda.stream(side)
            try:
                with stream:
                    save_prequantized(model, model_path, cache_dir)
            except Exception as e:  # a read-only or full volume must not stop serving
                log.warning("could not write the pre-quantized checkpoint to %s: %s", cache_dir, e)
                return None
            timings["save_prequantized"] = round(time.perf_counter() - t, 3)
            log.info("wrote the pre-quantized checkpoint to %s in %.1fs", cache_dir, timings["save_prequantized"])
            return timings["save_prequantized"]
        if not defer_save:
            on_phase("save_prequantized")
            pending_save()
            pending_save = None

    def _processor():
        try:
            return processor_job.result()
        except Exception as e:  # noqa: BLE001 - once more on this thread: a real error raises again here
            log.warning("loading the processor beside the model failed (%s: %s); loading it again", type(e).__name__,
                        e)
            return load_processor(model_path)

    processor = timed("processor_wait", _processor)
    timings["processor"] = processor_job.seconds
    if config.image_max_pixels:
        size = dict(getattr(processor.image_processor, "size", {}) or {})
        size["longest_edge"] = config.image_max_pixels
        processor.image_processor.size = size
    if native:
        gen_cfg = GenerationDefaults.from_dir(model_path)
    else:
        from transformers import GenerationConfig
        try:
            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except OSError:
            gen_cfg = model.generation_config
    choices.timings = timings
    log.info("model loaded: %s", json.dumps({**choices.labels(), "timings": timings,
                                              "weights": choices.weights}))
    return Loaded(model=model, processor=processor, tokenizer=processor.tokenizer, generation_config=gen_cfg,
                  choices=choices, placement=placement, save_prequantized=pending_save, idle_work=idle_work)


def _fp8_probe_beside(choices: Choices) -> bool:
    """Whether fp8.device_support runs on a thread of its own during the load: fp8 on a CUDA device (elsewhere
    it answers at once)."""
    return choices.quantization == "fp8" and choices.device.startswith("cuda")


def _start_fp8_probe(choices: Choices) -> "_Background":
    from . import fp8
    return _Background(lambda: fp8.device_support(choices.device))


def _fp8_kernel_warmup(config: Config, model) -> Iterator[None]:
    """fp8: every Triton kernel variant the model's calls can launch, compiled (or loaded from TRITON_CACHE_DIR) in
    steps the engine runs while idle after ready (fp8.warm_steps). Readiness does not wait for them: the graphs and
    the warm-up request captured before ready compile what a first request runs, and the rest on an empty cache
    took 3.4 s of a first start on an H200 (bench/RESULTS.md). The row classes follow the engine's slots
    (MAX_NUM_SEQS; the engine may get fewer where the KV cache does not fit them all, whose rows then fall in a
    class warmed here) and its decode buckets (CUDA_GRAPH_BATCH_SIZES)."""
    from . import fp8

    rows = fp8.row_classes(config.max_num_seqs, fp8.SMALL_M_MAX, tuple(config.cuda_graph_batch_sizes or ()))
    res: dict = {}
    yield from fp8.warm_steps(model, rows, res)
    log.info("fp8: kernels warmed for rows %s: %s", rows, json.dumps(res))


class _Background:
    """Runs `fn` on a daemon thread; `result()` waits and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn, self._value, self._error, self.seconds = fn, None, None, 0.0
        self._thread = threading.Thread(target=self._run, name="load-background", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            self._value = self._fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in result()
            self._error = e
        self.seconds = round(time.perf_counter() - t, 3)

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
