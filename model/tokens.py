"""A chat tokenizer without transformers: the ``tokenizers`` library plus the checkpoint's Jinja chat template.

It renders prompts exactly as transformers' ``apply_chat_template`` does (same Jinja environment and
globals, the tokenizer's special tokens as template variables, the text encoded without added special
tokens), so the token ids are the same; ``tests/test_llama.py`` compares them. It offers the part of
a transformers tokenizer that ``model.runtime`` uses.

One deliberate difference: control tokens inside message text ("<|im_end|>" typed by a user, or
pasted from a ticket) are encoded as the plain characters they are, never as the control token, so
chat text cannot close its own turn and open a system turn. (transformers does this only when asked,
``sanitize_control_tokens=True``; the marker scheme is the same.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from core.errors import ModelError
from model.llama import Unsupported

# Private-use characters wrap a control token found in message text, so that after rendering it can be
# told apart from the control tokens the template writes itself.
_START, _END = "\ue000", "\ue001"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json serializes it
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile(template: str) -> Any:
    """The template in the Jinja environment transformers renders chat templates in."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatTokenizer:
    """``tokenizer.json`` + the chat template of a model folder."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # OSError, bad JSON, or the tokenizers library's own Exception
            raise Unsupported(f"{folder}: no tokenizer.json this reader can load: {err}") from err
        template_file = folder / "chat_template.jinja"
        try:
            template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        except (OSError, UnicodeDecodeError) as err:
            raise Unsupported(f"{folder}: the chat template cannot be read: {err}") from err
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise Unsupported(f"{folder}: no chat template")
        if config.get("clean_up_tokenization_spaces") and type(self._tok.model).__name__ != "BPE":
            raise Unsupported(f"{folder}: decoding needs transformers' space clean-up")
        try:
            self._template = _compile(template)
        except Exception as err:  # e.g. transformers' own {% generation %} tag, which this environment lacks
            raise Unsupported(f"{folder}: the chat template needs transformers: {err}") from err
        # Special tokens from tokenizer_config.json; one it does not name is taken from special_tokens_map.json.
        try:
            mapped = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            mapped = {}
        self.special = {
            name: text for name in SPECIAL_NAMES if (text := _token_text(config.get(name)) or _token_text(mapped.get(name)))
        }
        self.eos_token_id = self._id(self.special.get("eos_token"))
        pad = self._id(self.special.get("pad_token"))
        self.pad_token_id = self.eos_token_id if pad is None else pad
        controls = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, controls)) or "(?!)")
        self._marked = re.compile(f"{_START}({self._controls.pattern}){_END}|[{_START}{_END}]")
        self._as_text: Any = None  # a copy that reads control tokens as text, made when first needed

    def _id(self, token: str | None) -> int | None:
        return self._tok.token_to_id(token) if token else None

    def _mark(self, value: Any) -> Any:
        if isinstance(value, str):
            value = value.replace(_START, "").replace(_END, "")
            return self._controls.sub(lambda m: f"{_START}{m.group(0)}{_END}", value)
        return value

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        marked = [{k: self._mark(v) for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=marked, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **self.special)  # fmt: skip
        except Exception as err:  # a template's own raise_exception, or a Jinja error
            raise ModelError(f"the chat template failed: {err}") from err

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return text
        pieces = self._marked.split(text)  # text, marked token (or None), text, ...
        ids = self.encode(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            ids += self._text_ids(piece) if i % 2 == 1 else self.encode(piece)
        return ids

    def _text_ids(self, piece: str) -> list[int]:
        if self._as_text is None:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(self._tok.to_str())
            copy.encode_special_tokens = True
            self._as_text = copy
        return list(self._as_text.encode(piece, add_special_tokens=False).ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
