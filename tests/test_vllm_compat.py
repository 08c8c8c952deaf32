"""vLLM compatibility against the real server (uvicorn subprocess, the tiny model, the real LocalEngine) with the
openai SDK, LangChain and httpx: clean content, the checkpoint's sampling defaults, every field honored or refused
with a 400 naming it, and the endpoints agent stacks call (issue 18)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from function.tiny_model import SPECIAL_TOKENS, TEXT_TOKENS

from test_e2e_servers import MODEL, REQUEST_TIMEOUT_S, Server, running_server

SPECIAL_TEXT = [t for t in SPECIAL_TOKENS if t not in TEXT_TOKENS]
HI = [{"role": "user", "content": "打开微信 and tap the button"}]


@pytest.fixture(scope="module")
def server(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server("uvicorn", model_cache_dir, tmp_path_factory.mktemp("server-vllm"),
                        {"MAX_NUM_SEQS": "4", "MAX_MODEL_LEN": "2048", "DEFAULT_MAX_TOKENS": "24"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server: Server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S,
                       max_retries=0) as c:
        yield c


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)


def token_id(server: Server, text: str) -> int:
    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    (tid,) = r.json()["tokens"]
    return tid


def stream_text(oai: openai.OpenAI, **kw) -> tuple[str, str | None, str | None]:
    content, reasoning, finish = "", "", None
    for chunk in oai.chat.completions.create(model=MODEL, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    return content, reasoning or None, finish


# --- output hygiene
@pytest.mark.parametrize("reasoning", [False, True])
def test_no_special_token_text_in_content_and_stream_equals_non_stream(oai, reasoning):
    extra = {"return_reasoning": True} if reasoning else {}
    seen_stop = 0
    for seed in range(12):
        ask = dict(messages=HI, max_tokens=24, temperature=1.0, seed=seed, extra_body=extra)
        r = oai.chat.completions.create(model=MODEL, **ask)
        msg = r.choices[0].message
        text = msg.content + (getattr(msg, "reasoning_content", None) or "")
        assert not [t for t in SPECIAL_TEXT if t in text], (seed, text)
        if reasoning:
            assert not any(tag in msg.content for tag in ("<think>", "</think>", "<answer>", "</answer>"))
        seen_stop += r.choices[0].finish_reason == "stop"
        content, reasoning_text, finish = stream_text(oai, **ask)
        assert (content, finish) == (msg.content, r.choices[0].finish_reason), seed
        assert reasoning_text == (getattr(msg, "reasoning_content", None) or None)


def test_end_token_text_absent_unless_asked(server: Server, oai):
    eos = token_id(server, "<|observation|>")          # one of the checkpoint's end tokens, a special token
    answer_end = token_id(server, "</answer>")         # an end token that is not special
    for end, text in ((eos, "<|observation|>"), (answer_end, "</answer>")):
        ask = dict(model=MODEL, messages=HI, max_tokens=8, logit_bias={str(end): 100})
        r = oai.chat.completions.create(**ask)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "stop")
        assert r.choices[0].model_extra["stop_reason"] == end and r.usage.completion_tokens == 1
        kept = oai.chat.completions.create(**ask, extra_body={"include_stop_str_in_output": True,
                                                              "skip_special_tokens": False})
        assert kept.choices[0].message.content == text
    # stop_token_ids: the same
    forced = token_id(server, " tap")
    r = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, logit_bias={str(forced): 100},
                                    extra_body={"stop_token_ids": [forced]})
    assert r.choices[0].message.content == "" and r.choices[0].model_extra["stop_reason"] == forced


def test_stop_string_included_only_when_asked(oai):
    base = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].message.content
    stop = base[4:7]
    assert stop.strip()
    cut = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True}).choices[0].message.content
    kept = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert cut == base[:base.index(stop)]
    assert kept.choices[0].message.content == cut + stop


# --- the checkpoint's generation_config.json
def test_generation_config_defaults_shown_and_applied(server: Server, oai):
    card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert card["default_sampling_params"] == {"top_k": 2, "top_p": 1e-05, "repetition_penalty": 1.1}
    assert "default sampling parameters from the checkpoint's generation_config.json" in server.log()
    # top_p 1e-5: greedy-like, so identical requests without sampling fields give identical outputs
    outs = {oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16).choices[0].message.content
            for _ in range(4)}
    assert len(outs) == 1
    # a request's own fields win: plain sampling at temperature 1 differs across seeds
    sampled = {oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, top_p=1.0, seed=s,
                                           extra_body={"top_k": -1}).choices[0].message.content for s in range(4)}
    assert len(sampled) > 1


def test_generation_config_vllm_turns_the_defaults_off(model_cache_dir: Path, tmp_path: Path):
    with running_server("uvicorn", model_cache_dir, tmp_path, {"MAX_NUM_SEQS": "2", "MAX_MODEL_LEN": "1024",
                                                               "GENERATION_CONFIG": "vllm", "WARMUP": "false"}) as srv:
        card = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"][0]
        assert card["default_sampling_params"] == {}
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S,
                           max_retries=0) as c:
            outs = {c.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, seed=s)
                    .choices[0].message.content for s in range(4)}
        assert len(outs) > 1            # vLLM's defaults: temperature 1, no top-k/top-p


# --- fields honored
def test_logit_bias_forces_every_token(server: Server, oai):
    forced = token_id(server, " tap")
    r = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=10, temperature=1.0, seed=3,
                                    logit_bias={str(forced): 100}, logprobs=True)
    assert r.usage.completion_tokens == 10
    assert [t.token for t in r.choices[0].logprobs.content] == [" tap"] * 10
    assert r.choices[0].message.content == " tap" * 10


def test_min_tokens_prevents_an_early_end(server: Server, oai):
    eos = token_id(server, "<|endoftext|>")
    ask = dict(model=MODEL, messages=HI, max_tokens=20, logit_bias={str(eos): 100})
    assert oai.chat.completions.create(**ask).usage.completion_tokens == 1
    r = oai.chat.completions.create(**ask, extra_body={"min_tokens": 6})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (7, "stop")


def test_allowed_token_ids_and_min_p(server: Server, oai):
    allowed = [token_id(server, w) for w in (" tap", " the", " app")]
    r = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=1.0, seed=1,
                                    logprobs=True, extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert {t.token for t in r.choices[0].logprobs.content} <= {" tap", " the", " app"}
    # min_p 1: only the most likely token survives, which is what greedy picks
    greedy = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "repetition_penalty": 1.0}
                                         ).choices[0].message.content
    for seed in range(3):
        r = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=1.5, top_p=1.0,
                                        seed=seed, extra_body={"min_p": 1.0, "top_k": -1, "ignore_eos": True,
                                                               "repetition_penalty": 1.0})
        assert r.choices[0].message.content == greedy


def test_n_2_gives_two_choices_that_differ(oai):
    r = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, n=2, temperature=1.0, top_p=1.0,
                                    seed=7, extra_body={"top_k": -1, "ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 32
    streamed = {0: "", 1: ""}
    for chunk in oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, n=2, temperature=1.0,
                                             top_p=1.0, seed=7, stream=True,
                                             extra_body={"top_k": -1, "ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == {0: r.choices[0].message.content, 1: r.choices[1].message.content}


def test_logprobs_match_a_softmax_of_the_models_logits(server: Server, oai, model_cache_dir: Path):
    from transformers import Glm4vForConditionalGeneration

    ids = post(server, "/tokenize", {"messages": HI}).json()["tokens"]
    model = Glm4vForConditionalGeneration.from_pretrained(model_cache_dir / "tiny-glm4v").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    want = torch.log_softmax(logits, -1)
    top = want.topk(5)
    r = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0, logprobs=True,
                                    top_logprobs=5)
    first = r.choices[0].logprobs.content[0]
    assert first.logprob == pytest.approx(top.values[0].item(), abs=1e-3)   # greedy: the sampled one is the best
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    texts = post(server, "/detokenize", {"tokens": [int(top.indices[0])]}).json()["prompt"]
    assert first.top_logprobs[0].token == texts
    # streaming carries the same logprobs
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0, logprobs=True,
                                              top_logprobs=5, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in r.choices[0].logprobs.content])


def test_continuous_usage_stats(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, stream=True,
                                              stream_options={"include_usage": True, "continuous_usage_stats": True},
                                              extra_body={"ignore_eos": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.usage]
    assert counts and counts == sorted(counts) and counts[-1] == 6


# --- fields refused
@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("prompt_logprobs", 1), ("echo", True), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
    ("guided_choice", ["a"]), ("guided_grammar", "root ::= x"), ("structured_outputs", {"json": {}}),
    ("best_of", 2), ("use_beam_search", True), ("bad_words", ["x"]), ("logits_processors", ["x"]),
    ("functions", [{"name": "f"}]), ("reasoning_effort", "low"), ("min_p", 5), ("top_logprobs", 3),
    ("logit_bias", {"x": 1}), ("logit_bias", {"5": 500}), ("logit_bias", {"99999999": 1}),
    ("allowed_token_ids", [99999999]), ("min_tokens", 100), ("n", 17), ("truncate_prompt_tokens", 5),
    ("add_generation_prompt", False), ("chat_template", "{{ x }}"), ("cache_salt", "s"), ("audio", {"voice": "x"}),
])
def test_refused_fields_get_a_400_naming_them(server: Server, field, value):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 4, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_refused_field_through_the_sdk(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=HI, extra_body={"guided_json": {"type": "object"}})
    assert e.value.param == "guided_json"


# --- endpoints
def test_completions_endpoint(server: Server, oai):
    r = oai.completions.create(model=MODEL, prompt="tap the button", max_tokens=6, temperature=0,
                               extra_body={"ignore_eos": True}, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and len(r.choices[0].logprobs.tokens) == 6
    assert "".join(r.choices[0].logprobs.tokens) == r.choices[0].text
    ids = post(server, "/tokenize", {"prompt": "tap the button"}).json()["tokens"]
    same = oai.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert same.choices[0].text == r.choices[0].text and same.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt="tap the button", max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == r.choices[0].text
    two = oai.completions.create(model=MODEL, prompt=["tap", "swipe up"], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    for bad in ({"echo": True}, {"suffix": "x"}, {"prompt": [99999999]}):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2, **bad}
        resp = post(server, "/v1/completions", body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == next(iter(bad)), resp.text


def test_tokenize_detokenize_version(server: Server):
    r = post(server, "/tokenize", {"prompt": "打开微信"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 2048
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "打开微信"}
    chat = post(server, "/tokenize", {"messages": HI, "return_token_strs": True}).json()
    assert chat["token_strs"][:2] == ["[gMASK]", "<sop>"] and chat["count"] > r["count"]
    r2 = httpx.post(f"{server.url}/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                    json={"model": MODEL, "messages": HI, "max_tokens": 1})
    assert r2.json()["usage"]["prompt_tokens"] == chat["count"]
    assert post(server, "/detokenize", {"tokens": [99999999]}).status_code == 400
    assert post(server, "/tokenize", {}).status_code == 400
    v = httpx.get(f"{server.url}/version", timeout=10)
    assert v.status_code == 200 and json.loads(v.text)["version"]


def test_langchain_content_is_clean(server: Server):
    from langchain_openai import ChatOpenAI

    eos = token_id(server, "<|observation|>")
    for extra in ({}, {"enable_thinking": True, "return_reasoning": True}):
        llm = ChatOpenAI(model=MODEL, temperature=0.5, base_url=f"{server.url}/v1", api_key="EMPTY",
                         extra_body=extra, streaming=True, timeout=REQUEST_TIMEOUT_S, max_retries=0,
                         max_tokens=12, logit_bias={eos: 5})
        for _ in range(3):
            msg = llm.invoke("你是谁？")
            assert not [t for t in SPECIAL_TEXT if t in msg.content], msg.content
