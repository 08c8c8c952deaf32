"""Turning a chat into model inputs with the checkpoint's own processor and chat template: token ids, image
patches per image, 3-D M-RoPE positions (the model's own `get_rope_index`) and prefix-reuse keys.

Runs on CPU in a worker thread, never on the event loop or the GPU thread.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .protocol import ChatInput, InvalidInput, SamplingParams


class PromptImage(NamedTuple):
    """One image of a prompt: its token span [start, end), its pixel patches [N, C*T*P*P] (in the vision tower's
    dtype) and its grid_thw [3]. A tuple, so the scheduler's `for start, end, *_ in images` needs no torch."""
    start: int
    end: int
    pixels: torch.Tensor
    grid: torch.Tensor


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    position_ids: torch.Tensor                 # [3, L] long (CPU)
    rope_delta: int                            # decode position = cache position + rope_delta
    keys: np.ndarray                           # [L] int64: token ids, image tokens replaced by a per-image key
    images: list[PromptImage] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class InputPreparer:
    def __init__(self, processor, model, max_model_len: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(model.config.image_token_id)
        self._rope_index = model.model.get_rope_index
        # the vision tower casts pixel values to its dtype first thing (get_image_features); casting here instead
        # gives it the same values and halves what a queued screenshot holds in host memory (fp32: ~63 MB for
        # 1080x2400, times every request waiting for a slot) and the host-to-device copy in its prefill
        visual = getattr(model.model, "visual", None)
        self.pixel_dtype = getattr(visual, "dtype", None)
        self.max_model_len = max_model_len
        # the longest token's text: a prompt of C characters has at least C / this many tokens (a cheap bound
        # checked before tokenizing, so that megabytes of text are refused without being tokenized)
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self.max_token_chars = max((len(t) for t in vocab if t), default=1)

    def _skip_thinking(self, enc):
        """enable_thinking=false: the generation prompt must end with an empty think block. Templates that know the
        flag (GLM-4.5 style) add it; GLM-4.1V's own template ignores it, so the block is appended here."""
        empty = self.tokenizer("<think></think>", add_special_tokens=False)["input_ids"]
        ids = enc["input_ids"][0].tolist()
        if ids[-len(empty):] == empty:
            return enc
        return _append_tokens(enc, empty)

    def prepare(self, chat: ChatInput, params: SamplingParams, check_length: bool = True) -> PreparedPrompt:
        if chat.prompt_token_ids is not None:
            return self._raw(chat.prompt_token_ids, params, check_length)
        chars = sum(len(p) if isinstance(p, str) else len(p.get("text") or "") for m in chat.messages
                    for p in ([m["content"]] if isinstance(m["content"], str) else m["content"]))
        if -(-chars // self.max_token_chars) >= self.max_model_len:     # the messages alone cannot fit
            raise InvalidInput(f"This model's maximum context length is {self.max_model_len} tokens; the messages "
                               f"have {chars} characters, at least {-(-chars // self.max_token_chars)} tokens. Please "
                               "reduce the length of the messages.", param="messages")
        try:
            enc = self.processor.apply_chat_template(
                chat.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                **chat.chat_template_kwargs)
        except InvalidInput:
            raise
        except Exception as e:  # template or processor rejected the input (e.g. an image too small to patch)
            raise InvalidInput(f"could not build the prompt: {e}", param="messages") from None
        if chat.chat_template_kwargs.get("enable_thinking") is False:
            enc = self._skip_thinking(enc)
        ids = enc["input_ids"][0]
        L = ids.shape[0]
        want = params.max_tokens or 1
        if check_length and L + want > self.max_model_len:
            raise InvalidInput(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{L + want} tokens ({L} in the messages, {want} in the completion). Please reduce the length of "
                "the messages or completion.", param="messages" if L >= self.max_model_len else "max_tokens")
        grid = enc.get("image_grid_thw")
        tt = enc.get("mm_token_type_ids")
        if tt is None:
            tt = (enc["input_ids"] == self.image_token_id).int()
        with torch.no_grad():
            pos, delta = self._rope_index(enc["input_ids"], mm_token_type_ids=tt, image_grid_thw=grid,
                                          attention_mask=enc.get("attention_mask"))
        keys = ids.numpy().astype(np.int64).copy()
        images = []
        if grid is not None:
            is_img = (ids == self.image_token_id).numpy()
            starts = np.flatnonzero(is_img & ~np.concatenate([[False], is_img[:-1]]))
            merge = self.processor.image_processor.merge_size
            pv = enc["pixel_values"]
            offset = 0
            if len(starts) != grid.shape[0]:
                raise InvalidInput("image placeholders do not match the images", param="messages")
            for i, (s, g) in enumerate(zip(starts.tolist(), grid)):
                n_patches = int(g.prod())
                n_tokens = n_patches // (merge * merge)
                digest = chat.image_digests[i] if i < len(chat.image_digests) else \
                    hashlib.sha256(pv[offset:offset + n_patches].numpy().tobytes()).hexdigest()
                keys[s:s + n_tokens] = -(int(digest[:15], 16) + 1)
                pixels = pv[offset:offset + n_patches]
                if self.pixel_dtype is not None and pixels.is_floating_point():
                    pixels = pixels.to(self.pixel_dtype)
                images.append(PromptImage(s, s + n_tokens, pixels, g.clone()))
                offset += n_patches
        return PreparedPrompt(token_ids=ids.tolist(), position_ids=pos[:, 0], rope_delta=int(delta.view(-1)[0]),
                              keys=keys, images=images)


    def _raw(self, token_ids: list[int], params: SamplingParams, check_length: bool) -> PreparedPrompt:
        """A prompt of token ids as given (/v1/completions): no template, text positions (M-RoPE t=h=w)."""
        vocab = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad or not token_ids:
            raise InvalidInput(f"prompt token ids {bad[:5]} are not in the vocabulary (0..{vocab - 1})" if bad else
                               "the prompt is empty", param="prompt")
        if self.image_token_id in token_ids:
            raise InvalidInput("a raw prompt cannot hold image placeholder tokens; send images through "
                               "/v1/chat/completions", param="prompt")
        L, want = len(token_ids), params.max_tokens or 1
        if check_length and L + want > self.max_model_len:
            raise InvalidInput(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{L + want} tokens ({L} in the prompt, {want} in the completion). Please reduce the length of "
                "the prompt or completion.", param="prompt" if L >= self.max_model_len else "max_tokens")
        pos = torch.arange(L, dtype=torch.long).unsqueeze(0).expand(3, L).clone()
        return PreparedPrompt(token_ids=list(token_ids), position_ids=pos, rope_delta=0,
                              keys=np.asarray(token_ids, dtype=np.int64))


def _append_tokens(enc, extra: list[int]):
    add = torch.tensor([extra], dtype=enc["input_ids"].dtype)
    enc["input_ids"] = torch.cat([enc["input_ids"], add], dim=1)
    if enc.get("attention_mask") is not None:
        enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(add)], dim=1)
    if enc.get("mm_token_type_ids") is not None:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(add)], dim=1)
    return enc

