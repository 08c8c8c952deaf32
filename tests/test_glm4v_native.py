"""The native GLM-4.1V (function/engine/glm4v.py) against transformers' Glm4vForConditionalGeneration on the tiny
checkpoint, fp32 on CPU: the same parameter names, config values, M-RoPE positions, vision features, decoder states
and logits, through the engine's runner and slot cache too; its loading (files or a state dict read ahead, older key
layouts, tied embeddings, clear errors); and a fresh process that builds and runs it without importing
transformers."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.subproc import run_json

from function.engine import glm4v
from function.engine.glm4v import Glm4vNativeConfig, load_native, remap_checkpoint_key
from function.engine.runner import ModelRunner, PrefillItem

F32 = torch.float32


@pytest.fixture(scope="module")
def ref(tiny_dir):
    from transformers import Glm4vForConditionalGeneration
    return Glm4vForConditionalGeneration.from_pretrained(tiny_dir, dtype=F32).eval()


@pytest.fixture(scope="module")
def native(tiny_dir):
    return load_native(tiny_dir, F32, "cpu")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from function.engine.loader import load_processor
    return load_processor(tiny_dir)


def _encode(processor, images=(), text="open the settings app"):
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    msgs = [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": content}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


TWO_IMAGES = (Image.new("RGB", (56, 84), (10, 200, 30)), Image.new("RGB", (300, 200), (120, 20, 60)))


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- layout and config

def test_state_dict_names_shapes_and_values_match(ref, native):
    r, n = ref.state_dict(), native.state_dict()
    assert list(r) == list(n)
    for k in r:
        assert r[k].shape == n[k].shape and r[k].dtype == n[k].dtype, k
        assert torch.equal(r[k], n[k]), k
    # the non-persistent rotary buffers hold the same fp32 values
    rb = dict(ref.named_buffers())
    for k, b in native.named_buffers():
        assert b.dtype == F32 and torch.equal(b, rb[k]), k
    assert not any(p.requires_grad for p in native.parameters())


TEXT_ATTRS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_parameters",
              "pad_token_id", "attention_dropout")
VISION_ATTRS = ("depth", "hidden_size", "num_heads", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "out_hidden_size", "patch_size", "temporal_patch_size", "spatial_merge_size", "image_size",
                "in_channels", "rms_norm_eps", "hidden_act", "attention_bias", "rope_parameters")
ROOT_ATTRS = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
              "video_start_token_id", "video_end_token_id", "tie_word_embeddings", "model_type")


def _same_config(ours, theirs):
    for a in ROOT_ATTRS:
        assert getattr(ours, a) == getattr(theirs, a), a
    for a in TEXT_ATTRS:
        assert getattr(ours.text_config, a) == getattr(theirs.text_config, a), a
    assert getattr(ours.text_config, "head_dim", None) == getattr(theirs.text_config, "head_dim", None)
    for a in VISION_ATTRS:
        assert getattr(ours.vision_config, a) == getattr(theirs.vision_config, a), a


def test_config_attributes_match(ref, native, tiny_dir, tmp_path):
    _same_config(native.config, ref.config)
    cfg = native.config
    assert cfg.model_type == "glm4v" and cfg._name_or_path == str(tiny_dir)
    assert cfg.text_config.head_dim is None
    cfg.text_config._attn_implementation = "autoglm_slots"   # what the runner sets
    cfg._name_or_path = "elsewhere"
    d = cfg.to_dict()
    assert d["model_type"] == "glm4v" and d["text_config"]["model_type"] == "glm4v_text"
    assert d["vision_config"]["num_heads"] == 4 and "_attn_implementation" not in d["text_config"]
    assert Glm4vNativeConfig.from_dict(d).to_dict() == d
    cfg._name_or_path = str(tiny_dir)
    cfg.save_pretrained(tmp_path)   # what fp8.save_model writes beside a pre-quantized copy: both classes read it
    from transformers import Glm4vConfig
    _same_config(Glm4vNativeConfig.from_dir(tmp_path), ref.config)
    _same_config(cfg, Glm4vConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize("layout", [
    {},                                                                                    # every default
    {"text_config": {"rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]}, "rope_theta": 10000,
                     "partial_rotary_factor": 0.5, "tie_word_embeddings": True, "num_key_value_heads": None},
     "vision_config": {"num_attention_heads": 8, "num_hidden_layers": 3}},                 # transformers 4.5x
    {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "mrope_section": [2, 3, 3],
                                         "partial_rotary_factor": 0.25}, "head_dim": 64},
     "vision_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}},
     "image_token_id": 5, "torch_dtype": "bfloat16"},                                      # transformers 5.x
])
def test_config_json_layouts_parse_as_transformers_does(layout):
    from transformers import Glm4vConfig
    theirs = Glm4vConfig.from_dict(copy.deepcopy(layout))
    ours = Glm4vNativeConfig.from_dict(layout)
    _same_config(ours, theirs)


# ---------------------------------------------------------------------------------------------- positions

def test_get_rope_index_text_images_and_padding(ref, native, processor):
    text, image = _encode(processor), _encode(processor, TWO_IMAGES)
    for enc in (text, image):
        kw = dict(image_grid_thw=enc.get("image_grid_thw"), attention_mask=enc["attention_mask"])
        want = ref.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"], **kw)
        got = native.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"], **kw)
        derived = native.model.get_rope_index(enc["input_ids"], image_grid_thw=enc.get("image_grid_thw"))
        for g in (got, derived):
            assert torch.equal(g[0], want[0]) and torch.equal(g[1], want[1])
            assert g[0].dtype == want[0].dtype and g[1].dtype == want[1].dtype and g[1].shape == (1, 1)
    assert int(want[1]) < 0 and not torch.equal(want[0][0], want[0][1])   # the image prompt really is 3-D
    # a batch: the text prompt left-padded to the image prompt's length
    L = image["input_ids"].shape[1]
    pad = L - text["input_ids"].shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), text["input_ids"]], 1), image["input_ids"]])
    mask = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), text["attention_mask"]], 1),
                      image["attention_mask"]])
    types = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), text["mm_token_type_ids"]], 1),
                       image["mm_token_type_ids"]])
    kw = dict(mm_token_type_ids=types, image_grid_thw=image["image_grid_thw"], attention_mask=mask)
    want, got = ref.model.get_rope_index(ids, **kw), native.model.get_rope_index(ids, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------- the math

def test_image_features_per_image_match(ref, native, processor):
    enc = _encode(processor, TWO_IMAGES)
    with torch.no_grad():
        want = ref.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
        got = native.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
    assert len(got.pooler_output) == len(want.pooler_output) == 2
    for g, w in zip(got.pooler_output, want.pooler_output):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)   # measured: ~2e-8
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert native.model.visual.dtype == F32


def test_text_decoder_and_full_forward_match(ref, native, processor):
    enc = _encode(processor, TWO_IMAGES)
    ids = enc["input_ids"]
    pos, _ = ref.model.get_rope_index(ids, mm_token_type_ids=enc["mm_token_type_ids"],
                                      image_grid_thw=enc["image_grid_thw"])
    with torch.no_grad():
        for p in (pos, pos[0], None):   # M-RoPE, text positions [B, L], none
            want = ref.model.language_model(input_ids=ids, position_ids=p).last_hidden_state
            got = native.model.language_model(input_ids=ids, position_ids=p).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)   # measured: 0.0
        want = ref(**enc).logits
        got = native(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)           # measured: ~1e-6


def test_runner_prefill_chunk_and_decode_match_transformers(tiny_dir, native, processor):
    """The engine's own path on both models: batched prefill (text and image, padded), greedy decode steps through
    the slot cache, and a chunk that continues a slot's cache (lower-right causal attention)."""
    from transformers import Glm4vForConditionalGeneration

    from function.engine.inputs import InputPreparer
    from function.engine.protocol import ChatInput, SamplingParams

    ref = Glm4vForConditionalGeneration.from_pretrained(tiny_dir, dtype=F32).eval()   # the runner alters it
    nat = load_native(tiny_dir, F32, "cpu")
    runners = [ModelRunner(m, num_slots=3, max_len=512, use_graphs=False) for m in (ref, nat)]
    prep = InputPreparer(processor, nat, max_model_len=512)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    chats = [ChatInput(messages=[{"role": "user", "content": "open the settings app"}]),
             ChatInput(messages=[{"role": "user", "content": [{"type": "image", "image": TWO_IMAGES[1]},
                                                              {"type": "text", "text": "tap the icon"}]}])]
    prompts = [prep.prepare(c, params) for c in chats]
    items = [PrefillItem(slot=i, token_ids=p.token_ids, start=0, position_ids=p.position_ids, images=p.images)
             for i, p in enumerate(prompts)]
    logits = [r.prefill(items) for r in runners]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    gen = [[int(t)] for t in logits[0].argmax(-1)]
    assert gen == [[int(t)] for t in logits[1].argmax(-1)]
    for _ in range(3):
        outs = []
        for r in runners:
            r.feed(torch.arange(2), torch.tensor([g[-1] for g in gen]))
            outs.append(r.decode([0, 1], [p.length + len(g) - 1 for p, g in zip(prompts, gen)],
                                 [p.rope_delta for p in prompts]))
        torch.testing.assert_close(outs[1][:2], outs[0][:2], atol=1e-5, rtol=1e-5)
        assert outs[1][:2].argmax(-1).tolist() == outs[0][:2].argmax(-1).tolist()
        for g, t in zip(gen, outs[0][:2].argmax(-1).tolist()):
            g.append(t)
    p = prompts[1]   # slot 2 takes the image prompt's first tokens from slot 1, prefills the last 5
    chunk = []
    for r in runners:
        r.copy_prefix(1, 2, p.length - 5)
        chunk.append(r.prefill([PrefillItem(slot=2, token_ids=p.token_ids, start=p.length - 5,
                                            position_ids=p.position_ids, images=p.images)]))
    torch.testing.assert_close(chunk[1], chunk[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk[1][0], logits[1][1], atol=1e-4, rtol=1e-4)


def test_a_vision_encode_in_pieces_equals_the_whole_encode(tiny_dir, processor):
    """The runner's split encode (pieces of the tower's blocks over several steps, as the scheduler hands them
    out while streams decode) gives the features of one whole encode, bit for bit; an encode left unfinished is
    completed by the prefill that reaches the image; and the prefill logits are those of an unsplit prefill."""
    from function.engine.inputs import InputPreparer
    from function.engine.protocol import ChatInput, SamplingParams

    nat = load_native(tiny_dir, F32, "cpu")
    depth = len(nat.model.visual.blocks)
    r = ModelRunner(nat, num_slots=3, max_len=512, use_graphs=False)
    assert r.splits_encodes
    prep = InputPreparer(processor, nat, max_model_len=512)
    chat = ChatInput(messages=[{"role": "user", "content": [{"type": "image", "image": TWO_IMAGES[1]},
                                                            {"type": "text", "text": "tap the icon"}]}])
    p = prep.prepare(chat, SamplingParams(max_tokens=1, temperature=0.0))
    (img,) = p.images
    n = img.end - img.start
    whole: dict = {}
    r.encode([(whole, img, 0, n)])
    cuts = sorted({0, n, *(n * k // (2 * depth + 1) for k in range(1, 2 * depth + 1))})   # more pieces than blocks
    split: dict = {}
    for a, b in zip(cuts, cuts[1:]):
        r.encode([(split, img, a, b)])
        assert torch.is_tensor(split[img.start]) == (b == n)
        if b < n:
            assert split[img.start].blocks_done == depth * b // n
    assert torch.equal(split[img.start], whole[img.start])
    item = lambda slot, store: PrefillItem(slot=slot, token_ids=p.token_ids, start=0, position_ids=p.position_ids,
                                           images=p.images, features=store)
    unfinished: dict = {}
    r.encode([(unfinished, img, 0, n // 2)])
    got = r.prefill([item(0, unfinished)])
    assert torch.equal(unfinished[img.start], whole[img.start])
    torch.testing.assert_close(got, r.prefill([item(1, None)]), atol=0, rtol=0)


def test_fp8_conversion_finds_the_same_linears(tiny_dir, ref, native):
    from function.engine import fp8
    names = [fp8._targets(m, quantize_vision=q) for m in (ref, native) for q in (False, True)]
    assert names[0] == names[2] and names[1] == names[3]
    assert len(names[0]) == 2 * 6 and len(names[1]) == 2 * 6 + 2 * 5 + 4   # layers x 6; vision blocks x 5 + merger


# ---------------------------------------------------------------------------------------------- loading

def test_load_from_a_state_dict_equals_load_from_files(tiny_dir, native):
    state = load_file(str(tiny_dir / "model.safetensors"))
    again = load_native(tiny_dir, F32, "cpu", state_dict=state)
    assert not state   # consumed
    a, b = native.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.arange(20).view(1, -1)
    with torch.no_grad():
        assert torch.equal(native(input_ids=ids).logits, again(input_ids=ids).logits)


def test_load_casts_and_keeps_rotary_fp32(tiny_dir, native):
    half = load_native(tiny_dir, torch.bfloat16, "cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.dtype == torch.bfloat16
    assert half.model.visual.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    for (k, b), (_, b32) in zip(half.named_buffers(), native.named_buffers()):
        assert b.dtype == F32 and torch.equal(b, b32), k
    moved = copy.deepcopy(half).to(torch.float16)   # .to() recomputes inv_freq instead of rounding it
    assert all(b.dtype == F32 for b in moved.buffers())


def test_older_key_layouts_load(tiny_dir, native):
    assert remap_checkpoint_key("model.layers.3.mlp.down_proj.weight") == \
        "model.language_model.layers.3.mlp.down_proj.weight"
    assert remap_checkpoint_key("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert remap_checkpoint_key("model.language_model.model.norm.weight") == "model.language_model.norm.weight"
    for k in native.state_dict():
        assert remap_checkpoint_key(k) == k
    old = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
           for k, v in load_file(str(tiny_dir / "model.safetensors")).items()}
    old["model.rotary_emb.inv_freq"] = torch.zeros(8)   # some old saves carry it: ignored
    loaded = load_native(tiny_dir, F32, "cpu", state_dict=old)
    a, b = native.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings(tiny_dir, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(tiny_dir / "model.safetensors"))
    del state["lm_head.weight"]
    m = load_native(tmp_path, F32, "cpu", state_dict=state)
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight


def test_a_checkpoint_that_does_not_match_is_refused(tiny_dir):
    state = load_file(str(tiny_dir / "model.safetensors"))
    del state["model.language_model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"1 missing .*layers\.1\.mlp\.down_proj\.weight"):
        load_native(tiny_dir, F32, "cpu", state_dict=state)
    state = load_file(str(tiny_dir / "model.safetensors"))
    state["model.language_model.layers.2.mlp.down_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 unexpected .*layers\.2\.mlp\.down_proj\.weight"):
        load_native(tiny_dir, F32, "cpu", state_dict=state)
    state = load_file(str(tiny_dir / "model.safetensors"))
    state["model.language_model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="size mismatch for model.language_model.norm.weight"):
        load_native(tiny_dir, F32, "cpu", state_dict=state)


def test_a_fresh_process_builds_and_runs_it_without_transformers(tiny_dir):
    out = run_json(f"""
        import json, sys
        import torch
        from function.engine import glm4v
        imported = "transformers" in sys.modules
        m = glm4v.load_native({str(tiny_dir)!r}, torch.float32, "cpu")
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        pos, delta = m.model.get_rope_index(ids)
        with torch.no_grad():
            h = m.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state
            feats = m.model.get_image_features(torch.randn(16, 1176), torch.tensor([[1, 4, 4]])).pooler_output
        print(json.dumps({{"at_import": imported, "after_use": "transformers" in sys.modules,
                          "shape": list(h.shape), "feats": list(feats[0].shape)}}))
    """)
    assert out == {"at_import": False, "after_use": False, "shape": [1, 5, 128], "feats": [4, 128]}


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_fused_qkv_equals_the_three_projections_and_keeps_the_state_dict(kind):
    """fuse_linear: one projection whose output splits into exactly what q/k/v computed (nn.Linear, and Fp8Linear
    whose per-channel scales concatenate), while the modules' parameters become views: the state dict, its values
    and the parameter count do not change (fp8.save_model and the checkpoint layout keep transformers' names)."""
    from torch import nn

    from function.engine import fp8

    g = torch.Generator().manual_seed(0)
    mods = [nn.Linear(64, n, bias=True) for n in (64, 16, 16)]
    for m in mods:
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    if kind == "fp8":
        mods = [fp8.Fp8Linear.from_linear(m) for m in mods]
    holder = nn.ModuleList(mods)
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    n_params = sum(p.numel() for p in holder.parameters())
    x = torch.randn(3, 5, 64, generator=g)
    want = [m(x) for m in mods]
    fused = glm4v.fuse_linear(list(mods))
    got = fused(x).split([64, 16, 16], dim=-1)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=1e-6, rtol=1e-6)
    after = holder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in holder.parameters()) == n_params
    assert mods[1].weight.data_ptr() == fused.weight.data_ptr() + 64 * 64 * fused.weight.element_size()
