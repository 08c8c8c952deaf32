"""The multi-GPU placement (function/engine/placement.py), on CPU: the full-size GLM-4.1V-9B shapes on the cards the
deployment guide names, the layer balance against brute force, the errors, and the device map against a real tiny
Glm4v model (every parameter and buffer covered, accepted by from_pretrained and by accelerate's dispatch with its
hooks, the engine's runner giving the same logits through those hooks)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Glm4vConfig

from function.config import Config, ConfigError
from function.engine.placement import (
    CUDA_CONTEXT_BYTES, EMBED, GIB, LAYER_PREFIX, LM_HEAD, NORM, ROTARY, VISUAL, PlacementError, _balance,
    check_devices, default_reserve_bytes, fit_kv, model_sizes, plan, weight_bytes_per_param,
)

# Total memory of the 24 GB-class cards as nvidia-smi (and torch's total_memory) reports it: L4 23034 MiB,
# A10G 23028 MiB, RTX 4090 / RTX A5000 24564 MiB. The smallest is the one the tests plan for.
CARD_24GB = 23028 * 2**20
CARD_80GB = 81559 * 2**20        # H100 80GB HBM3
NF4 = weight_bytes_per_param("nf4")
FULL = Glm4vConfig()             # transformers' defaults are GLM-4.1V-9B's shapes


def fits(p, gpu_bytes, utilization=0.90):
    """No card holds more than its share: weights + KV + context + reserve <= total x utilization."""
    for i, d in enumerate(p.devices):
        used = p.weight_bytes_per_device[i] + p.kv.kv_bytes_per_device[i]
        assert used <= p.usable_bytes_per_device[i], (d, used, p.usable_bytes_per_device[i])
        assert p.usable_bytes_per_device[i] <= int(gpu_bytes[i] * utilization)
    return True


# ------------------------------------------------------------------------------------------ the model's sizes

def test_full_size_shapes_and_weights():
    s = model_sizes(FULL)
    assert (s.num_layers, s.kv_heads, s.head_dim, s.tied) == (40, 2, 128, False)
    assert s.kv_bytes_per_token_per_layer(2) == 1024            # K+V x 2 heads x 128 x bf16
    assert 10.2e9 < s.params < 10.4e9                             # GLM-4.1V-9B: 10.29 B with the vision tower
    bf16 = sum(s.unit_bytes(u, 2.0, 2) for u in s.units)
    assert 20.5e9 < bf16 < 20.7e9                                 # ~20.6 GB of bf16 weights
    nf4 = sum(s.unit_bytes(u, NF4, 2) for u in s.units)
    # nf4 quantizes only the decoder's Linear weights: the vision tower, embeddings and lm_head stay bf16
    assert 8.5e9 < nf4 < 9.2e9
    assert model_sizes(FULL.to_dict()) == s                       # config.json dict works too


def test_sizes_match_the_real_module_tree():
    from transformers import Glm4vForConditionalGeneration
    with torch.device("meta"):
        m = Glm4vForConditionalGeneration(FULL)
    s = model_sizes(FULL)
    assert s.params == sum(p.numel() for p in m.parameters())
    layer = sum(p.numel() for p in m.model.language_model.layers[0].parameters())
    assert sum(s.units[LAYER_PREFIX + "7"]) == layer
    assert sum(s.units[VISUAL]) == sum(p.numel() for p in m.model.visual.parameters())


# ------------------------------------------------------------------------------------------ the deployment guide's 2 x 24 GB

def test_bf16_on_two_24gb_cards():
    gpus = [CARD_24GB, CARD_24GB]
    p = plan(FULL, 2, gpus, 2.0, max_num_seqs=32, max_model_len=16384)
    assert fits(p, gpus)
    assert sum(p.layers_per_device) == 40 and all(n > 0 for n in p.layers_per_device)
    dm = p.device_map
    assert dm[VISUAL] == dm[EMBED] == dm[ROTARY] == dm[LAYER_PREFIX + "0"] == "cuda:0"
    assert dm[LM_HEAD] == dm[NORM] == dm[LAYER_PREFIX + "39"] == "cuda:1"
    # contiguous: layers 0..n0-1 on card 0, the rest on card 1
    assert p.layer_devices == ["cuda:0"] * p.layers_per_device[0] + ["cuda:1"] * p.layers_per_device[1]
    assert [dm[f"{LAYER_PREFIX}{i}"] for i in range(40)] == p.layer_devices
    # card 0 carries the vision tower and the embeddings (~3 GB), card 1 only lm_head (~1.2 GB): fewer layers on 0
    assert p.layers_per_device[0] < p.layers_per_device[1]
    assert all(b > 0 for b in p.kv_budget_bytes_per_device)
    assert p.kv.capacity_tokens == min(p.kv_tokens_per_device)
    assert p.binding_device == p.devices[p.kv_tokens_per_device.index(p.kv.capacity_tokens)]
    # 32 x 16k does not fit in the ~12 GB left for KV: fewer full-length slots, said so
    assert 1 <= p.kv_slots < 32 and p.max_len == 16384
    assert p.kv_slots * (p.max_len + 1) <= p.kv.capacity_tokens < (p.kv_slots + 1) * (p.max_len + 1)
    assert any("MAX_NUM_SEQS=32" in n and "binding" in n for n in p.notes)


def test_two_24gb_cards_hold_32_slots_of_8k():
    """The setting k8s/variants/service-2gpu.yaml uses (its own test checks the manifest against this plan)."""
    gpus = [CARD_24GB, CARD_24GB]
    p = plan(FULL, 2, gpus, 2.0, max_num_seqs=32, max_model_len=8192)
    assert fits(p, gpus)
    assert (p.kv_slots, p.max_len, p.notes) == (32, 8192, [])


def test_one_24gb_card_cannot_hold_bf16():
    s = model_sizes(FULL)
    weights = sum(s.unit_bytes(u, 2.0, 2) for u in s.units)
    cap = int(CARD_24GB * 0.90)
    # What is true: the bf16 weights alone (20.6 GB) fit under 90% of the card (21.7 GB) ...
    assert weights < cap
    # ... but not with the CUDA context and the engine's activation reserve, whatever MAX_NUM_SEQS is
    assert weights + CUDA_CONTEXT_BYTES + default_reserve_bytes(1) > cap
    for seqs in (1, 32):
        with pytest.raises(PlacementError) as e:
            plan(FULL, 1, [CARD_24GB], 2.0, max_num_seqs=seqs)
        msg = str(e.value)
        assert "does not fit on 1 GPU" in msg and "20.6 GB" in msg
        assert "QUANTIZATION=nf4" in msg and "GPUS_PER_POD=2" in msg
    # Even with no activation reserve at all, what is left is not one 16k-token sequence of KV
    with pytest.raises(PlacementError, match="no room for the KV cache"):
        plan(FULL, 1, [CARD_24GB], 2.0, max_num_seqs=1, reserve_bytes=0, min_model_len=16384)
    # and it is a ConfigError: readiness reports it like any other bad setting
    assert issubclass(PlacementError, ConfigError)


def test_one_80gb_card_and_nf4_on_24gb_fit():
    p = plan(FULL, 1, [CARD_80GB], 2.0)
    assert p.device_map == "cuda:0" and p.layers_per_device == [40] and p.layer_devices == ["cuda:0"] * 40
    assert (p.kv_slots, p.max_len) == (32, 16384) and fits(p, [CARD_80GB])
    q = plan(FULL, 1, [CARD_24GB], NF4)
    assert q.device_map == "cuda:0" and fits(q, [CARD_24GB])
    assert q.kv_slots >= 1 and q.max_len == 16384
    assert q.weight_bytes_per_device[0] < p.weight_bytes_per_device[0] / 2


def test_single_gpu_plan_is_the_engines_single_card_budget():
    """GPUS_PER_POD=1: the same budget engine/client.py takes on one card (total x util - used - reserve)."""
    p = plan(FULL, 1, [CARD_80GB], 2.0, max_num_seqs=32)
    budget = int(CARD_80GB * 0.9) - (CUDA_CONTEXT_BYTES + p.weight_bytes_per_device[0]) - default_reserve_bytes(32)
    assert p.kv_budget_bytes_per_device == [budget]
    assert p.kv.capacity_tokens == budget // (40 * 1024)


@pytest.mark.parametrize("n", [3, 4])
def test_more_cards_and_unequal_cards(n):
    gpus = [CARD_24GB] * n
    p = plan(FULL, n, gpus, 2.0)
    assert fits(p, gpus) and sum(p.layers_per_device) == 40 and p.devices == [f"cuda:{i}" for i in range(n)]
    assert p.device_map[LM_HEAD] == f"cuda:{n - 1}" and p.device_map[VISUAL] == "cuda:0"
    assert (p.kv_slots, p.max_len) == (32, 16384)
    big = plan(FULL, 2, [CARD_24GB, 2 * CARD_24GB], 2.0)
    assert big.layers_per_device[1] > 2 * big.layers_per_device[0] and fits(big, [CARD_24GB, 2 * CARD_24GB])


@pytest.mark.parametrize("free", [[9e9, 11e9], [12e9, 12e9], [5e9, 20e9], [20e9, 4e9], [3e9, 3e9, 12e9]])
def test_balance_is_optimal(free):
    """The split maximises the binding card's KV tokens (brute force over every contiguous split)."""
    import itertools
    free = [int(f) for f in free]
    w, k, L = 407_938_048, 1024, 40

    def capacity(ns):
        caps = [(f - n * w) // (n * k) for f, n in zip(free, ns) if n]
        return min(caps) if all(f - n * w >= 0 for f, n in zip(free, ns)) else -1

    ns = _balance(free, w, k, L)
    best = max(capacity(c) for c in itertools.product(range(L + 1), repeat=len(free)) if sum(c) == L)
    assert sum(ns) == L and capacity(ns) == best


def test_fit_kv_shrinks_slots_then_length():
    per = 1024
    full = fit_kv([20, 20], [20 * 32 * 8193 * per] * 2, per, 32, 8192)
    assert (full.slots, full.max_len, full.notes) == (32, 8192, [])
    fewer = fit_kv([20, 20], [20 * 10 * 8193 * per, 20 * 12 * 8193 * per], per, 32, 8192)
    assert (fewer.slots, fewer.max_len, fewer.binding_device) == (10, 8192, 0)
    shorter = fit_kv([20, 20], [20 * 6000 * per] * 2, per, 32, 8192)
    assert (shorter.slots, shorter.max_len) == (1, 5999)
    with pytest.raises(PlacementError, match="cuda:1 holds 3000 tokens"):
        fit_kv([20, 20], [20 * 6000 * per, 20 * 3000 * per], per, 32, 8192)
    assert fit_kv([0, 40], [0, 40 * 100 * per], per, 1, 50).tokens_per_device == [None, 100]


# ------------------------------------------------------------------------------------------ validation

def test_too_few_visible_gpus():
    with pytest.raises(PlacementError) as e:
        plan(FULL, 2, [CARD_24GB], 2.0, cuda_visible_devices="0")
    assert str(e.value) == ('GPUS_PER_POD=2 but 1 CUDA device is visible (CUDA_VISIBLE_DEVICES=0); set '
                            'nvidia.com/gpu: "2" in the pod\'s resources.limits, or GPUS_PER_POD=1')
    with pytest.raises(PlacementError, match=r"GPUS_PER_POD=4 but 2 CUDA devices are visible; .*GPUS_PER_POD=2"):
        check_devices(4, 2)
    with pytest.raises(PlacementError, match=r"no CUDA device is visible \(CUDA_VISIBLE_DEVICES=<empty>\)"):
        check_devices(2, 0, cuda_visible_devices="")
    with pytest.raises(PlacementError, match="DEVICE=cpu"):
        check_devices(2, 2, device="cpu")
    with pytest.raises(PlacementError, match="DEVICE=cuda:1 names one card"):
        check_devices(2, 2, device="cuda:1")
    check_devices(1, 0)              # one card: the loader's own checks apply (DEVICE, REQUIRE_GPU)
    check_devices(2, 2, device="cuda")


def test_more_visible_gpus_than_configured_uses_the_first():
    p = plan(FULL, 2, [CARD_24GB] * 4, 2.0, max_model_len=8192)
    assert p.devices == ["cuda:0", "cuda:1"] and any("4 cards are visible" in n for n in p.notes)


def test_other_errors():
    with pytest.raises(PlacementError, match="more than the model's 40 decoder layers"):
        plan(FULL, 41, [CARD_80GB] * 41, 2.0)
    with pytest.raises(PlacementError, match="QUANTIZATION='fp4'"):
        weight_bytes_per_param("fp4")
    assert weight_bytes_per_param("none", 4) == 4.0 and weight_bytes_per_param("int8") == 1.0
    assert weight_bytes_per_param("fp8") == 1.0


def test_config_defaults_plan_on_one_gpu():
    """The app's defaults (GPUS_PER_POD=1, GPU_MEMORY_UTILIZATION, MAX_NUM_SEQS) give the single-device path."""
    c = Config()
    p = plan(FULL, c.gpus_per_pod, [CARD_80GB], NF4, max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len,
             utilization=c.gpu_memory_utilization)
    assert p.device_map == "cuda:0" and p.kv_slots == c.max_num_seqs


# ------------------------------------------------------------------------------------------ against a real tiny model

@pytest.fixture(scope="module")
def tiny_plan(tiny_dir):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tiny_dir)
    # small cards so that the tiny model's 2 layers split one per card
    s = model_sizes(cfg)
    card = 4 * sum(s.unit_bytes(u, 4.0, 4) for u in s.units)
    p = plan(cfg, 2, [card, card], 4.0, max_num_seqs=2, max_model_len=64, dtype_bytes=4, reserve_bytes=0,
             context_bytes=0, min_model_len=16)
    assert p.layers_per_device == [1, 1]
    return p


def _cpu(device_map: dict) -> dict:
    return {k: "cpu" for k in device_map}


def _owner(name: str, keys) -> list[str]:
    return [k for k in keys if name == k or name.startswith(k + ".")]


def test_device_map_covers_every_parameter_and_buffer(tiny_dir, tiny_plan):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    keys = list(tiny_plan.device_map)
    modules = dict(model.named_modules())
    assert all(k in modules for k in keys), [k for k in keys if k not in modules]
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for n in names:
        assert len(_owner(n, keys)) == 1, (n, _owner(n, keys))    # exactly one entry places it: no silent default
    from accelerate.utils import check_device_map
    check_device_map(model, tiny_plan.device_map)


def test_full_size_device_map_names_real_modules():
    from transformers import Glm4vForConditionalGeneration
    with torch.device("meta"):
        m = Glm4vForConditionalGeneration(FULL)
    p = plan(FULL, 2, [CARD_24GB, CARD_24GB], 2.0, max_model_len=8192)
    modules = dict(m.named_modules())
    assert all(k in modules for k in p.device_map)
    for n, _ in list(m.named_parameters()) + list(m.named_buffers()):
        assert len(_owner(n, p.device_map)) == 1, n
    # transformers' no-split classes are never cut: the map places whole decoder layers and the whole vision tower
    assert all(type(modules[k]).__name__ not in m._no_split_modules or k.startswith(LAYER_PREFIX)
               for k in p.device_map)
    for name, mod in m.named_modules():
        if type(mod).__name__ in m._no_split_modules:
            assert len(_owner(name, p.device_map)) == 1, name


def test_from_pretrained_accepts_the_map(tiny_dir, tiny_plan):
    from transformers import AutoModelForImageTextToText
    ref = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, device_map=_cpu(tiny_plan.device_map))
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_runner_through_accelerate_hooks(tiny_dir, tiny_plan):
    """With a multi-card map from_pretrained dispatches through accelerate (AlignDevicesHook on every map entry).
    force_hooks attaches the same hooks on CPU: the engine's runner, its slot cache passed through them, gives the
    logits of the plain model."""
    from accelerate import dispatch_model
    from transformers import AutoModelForImageTextToText

    from function.engine.runner import ModelRunner, PrefillItem

    plain = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    hooked = dispatch_model(copy.deepcopy(plain), device_map=_cpu(tiny_plan.device_map), force_hooks=True)
    assert hasattr(hooked.model.language_model.layers[1], "_hf_hook")
    outs = []
    for model in (plain, hooked):
        r = ModelRunner(model, num_slots=2, max_len=64, use_graphs=False)
        ids = [5, 9, 13, 17, 21, 25]
        pos = torch.arange(len(ids)).view(1, -1).expand(3, -1)
        first = r.prefill([PrefillItem(slot=0, token_ids=ids, start=0, position_ids=pos, images=[])])
        r.feed(torch.tensor([0]), first[:1].argmax(dim=-1))
        step = r.decode([0], [len(ids)], [0])
        outs.append((first[0], step[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
