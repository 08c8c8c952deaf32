"""Loading the checkpoint with transformers' own classes: device, dtype, attention and quantization choices, and
the pre-quantized copy on the model cache volume that lets later cold starts skip quantization.

Works the same for the real AutoGLM-Phone-9B directory and the embedded tiny model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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

    def labels(self) -> dict[str, str]:
        return {"model_path": self.model_path, "device": self.device, "dtype": self.dtype,
                "quantization": self.quantization, "attn_implementation": self.attn_implementation,
                "source": self.source}


def resolve_model_path(config: Config, on_phase: Callable[[str], None] = lambda p: None) -> tuple[Path, str]:
    """The checkpoint directory: MODEL_PATH, or the tiny model built once into the cache dir."""
    if config.model_path:
        p = Path(config.model_path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"MODEL_PATH={config.model_path!r} has no config.json: point MODEL_PATH at a "
                                    "local checkpoint directory (downloads are disabled; fill the model cache volume "
                                    "with the pre-quantize Job first)")
        return p, "checkpoint"
    on_phase("building tiny model")
    from ..tiny_model import build_tiny_model
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
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError(f"QUANTIZATION={quant} needs the bitsandbytes package, which is not installed") \
                from None
    attn = config.attn_implementation
    if attn == "auto":
        attn = "sdpa"
        if device.startswith("cuda"):
            try:
                import flash_attn  # noqa: F401
                attn = "flash_attention_2"
            except ImportError:
                pass
    return Choices(model_path=str(model_path), device=device, dtype=dtype, quantization=quant,
                   attn_implementation=attn, reason=reason)


def bnb_config(quant: str, quantize_vision: bool, dtype):
    """BitsAndBytesConfig. `llm_int8_skip_modules` replaces transformers' defaults, so lm_head is listed here;
    the vision tower stays in bf16 unless QUANTIZE_VISION is set (it is small and accuracy-sensitive)."""
    from transformers import BitsAndBytesConfig

    skip = ["lm_head"] + ([] if quantize_vision else ["visual", "model.visual"])
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _checkpoint_fingerprint(model_path: Path, choices: Choices, quantize_vision: bool) -> str:
    """Identifies (checkpoint contents, quantization settings, library versions) cheaply: file names, sizes and
    mtimes, not contents (hashing 20 GB would cost more than quantizing)."""
    import transformers

    try:
        import bitsandbytes
        bnb_v = bitsandbytes.__version__
    except ImportError:
        bnb_v = "none"
    h = hashlib.sha256()
    for p in sorted(model_path.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(f"{choices.quantization}:{choices.dtype}:{quantize_vision}:{transformers.__version__}:{bnb_v}:"
             f"{PREQUANT_FORMAT}".encode())
    return h.hexdigest()[:16]


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
    from . import fp8
    if fp8.converted_modules(model):
        fp8.save_model(model, tmp)
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


def load_processor(model_path: Path):
    """AutoProcessor, or, where torchvision is missing (its video processor needs it; images do not), the same
    Glm4vProcessor assembled from its image processor, tokenizer and chat template without the video part."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_path)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
    from transformers import AutoImageProcessor, AutoTokenizer, Glm4vProcessor

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
                raise ValueError("video input needs torchvision (Glm4vVideoProcessor), which is not installed")
            return super().__call__(*args, **kwargs)

    log.info("torchvision is not installed: using Glm4vProcessor without its video processor (images only)")
    return ImageOnlyGlm4vProcessor(image_processor=AutoImageProcessor.from_pretrained(model_path), tokenizer=tok,
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


def load(config: Config, on_phase: Callable[[str], None] = lambda p: None) -> Loaded:
    """Load model + processor. Phases are reported through `on_phase` and timed in `choices.timings`."""
    timings: dict[str, float] = {}

    def timed(phase, fn):
        on_phase(phase)
        t = time.perf_counter()
        r = fn()
        timings[phase] = round(time.perf_counter() - t, 3)
        return r

    model_path, source = resolve_model_path(config, on_phase)
    prefetch_weights(config, model_path)

    def _imports():
        import torch
        import transformers  # noqa: F401
        from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig  # noqa: F401
        return torch

    torch = timed("import", _imports)
    choices = choose(config, model_path)
    choices.source = source
    on_phase(f"quantization {choices.quantization} ({choices.reason})")
    if choices.device.startswith("cuda"):
        timed("cuda_init", lambda: torch.zeros(1, device=choices.device))
    from transformers import AutoModelForImageTextToText, GenerationConfig

    dtype = getattr(torch, choices.dtype)
    placement = None
    device_map = choices.device
    if choices.device.startswith("cuda"):
        from .placement import check_devices, plan, visible_gpu_bytes, weight_bytes_per_param

        check_devices(config.gpus_per_pod, torch.cuda.device_count(), device=config.device,
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        if config.gpus_per_pod > 1:
            from transformers import AutoConfig

            itemsize = torch.finfo(dtype).bits // 8
            placement = plan(AutoConfig.from_pretrained(model_path), config.gpus_per_pod, visible_gpu_bytes(),
                             weight_bytes_per_param(choices.quantization, itemsize),
                             max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                             utilization=config.gpu_memory_utilization, dtype_bytes=itemsize,
                             quantize_vision=config.quantize_vision, device=config.device)
            device_map = placement.device_map
            log.info("placement over %d GPUs: %s", config.gpus_per_pod, placement.summary())
    load_dir, kwargs = model_path, {}
    cache_dir = None
    if choices.quantization != "none":
        cache_dir = prequantized_dir(config, model_path, choices)
        if config.prequantized_cache and _complete(cache_dir):
            load_dir, choices.source = cache_dir, "prequantized-cache"
        elif choices.quantization != "fp8":
            kwargs["quantization_config"] = bnb_config(choices.quantization, config.quantize_vision, dtype)
    phase = "load_prequantized" if load_dir != model_path else (
        "load_and_quantize" if choices.quantization != "none" else "load_weights")
    def _from_pretrained():
        try:
            if choices.quantization == "fp8":
                from . import fp8
                if load_dir != model_path:
                    return fp8.load_model(load_dir, dtype=dtype, device_map=device_map,
                                          attn_implementation=choices.attn_implementation)
                m = AutoModelForImageTextToText.from_pretrained(
                    load_dir, dtype=dtype, device_map=device_map, attn_implementation=choices.attn_implementation)
                log.info("fp8 conversion: %s", fp8.convert(m.eval(), quantize_vision=config.quantize_vision))
                return m
            return AutoModelForImageTextToText.from_pretrained(
                load_dir, dtype=dtype, device_map=device_map, attn_implementation=choices.attn_implementation,
                **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - safetensors' own error class derives from Exception only
            if "out of memory" in str(e).lower() or isinstance(e, ImportError):
                raise
            fix = ("delete that directory so the next start quantizes again" if load_dir != model_path else
                   "re-copy the checkpoint (or re-run the model-cache Job)")
            raise RuntimeError(f"the checkpoint in {load_dir} could not be read; it is corrupt or incomplete "
                               f"({type(e).__name__}: {e}); {fix}") from e

    model = timed(phase, _from_pretrained)
    if cache_dir is not None and load_dir == model_path and config.prequantized_cache:
        try:
            timed("save_prequantized", lambda: save_prequantized(model, model_path, cache_dir))
        except Exception as e:  # a read-only or full volume must not stop serving
            log.warning("could not write the pre-quantized checkpoint to %s: %s", cache_dir, e)
    processor = timed("processor", lambda: load_processor(model_path))
    if config.image_max_pixels:
        size = dict(getattr(processor.image_processor, "size", {}) or {})
        size["longest_edge"] = config.image_max_pixels
        processor.image_processor.size = size
    try:
        gen_cfg = GenerationConfig.from_pretrained(model_path)
    except OSError:
        gen_cfg = model.generation_config
    choices.timings = timings
    log.info("model loaded: %s", json.dumps({**choices.labels(), "timings": timings}))
    return Loaded(model=model, processor=processor, tokenizer=processor.tokenizer, generation_config=gen_cfg,
                  choices=choices, placement=placement)
