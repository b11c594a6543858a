"""Token-level chat codec: prompts, tool observations and demonstrations as token ids.

Token-in/token-out: a trajectory is built by appending ids, never by re-tokenizing the whole
conversation (a template may render earlier turns differently once later ones exist, e.g. drop
their reasoning: the ids trained on are the ids the engine saw). Tool observations are rendered
by the model's own chat template as a *delta*: the template renders a stub conversation whose
assistant turn makes the very calls (structured `tool_calls`, ids in the parser's shape), with
the tool results after it, and the text after that turn's end is tokenized. A turn ends at the
first token the engine stops on (the tokenizer's eos and the generation config's eos ids:
`<|im_end|>`, `<|eot_id|>`, `<|eom_id|>`, `</s>`, `<|call|>`...), so no single-eos assumption.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

_STUB_USER = [{"role": "user", "content": "x"}]


class TemplateError(ValueError):
    """The chat template cannot render a conversation of this shape (e.g. parallel calls where it
    takes one call per turn), or renders it in a way a turn-by-turn rollout cannot follow."""


class ChatCodec:
    def __init__(self, tokenizer: Any, stop_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.eos_token_id, *stop_ids} - {None}
        self._stop_texts = sorted({tokenizer.decode([i], skip_special_tokens=False) for i in self.stop_ids}, key=len, reverse=True)
        self._header = self._render(_STUB_USER, add_generation_prompt=True)

    @classmethod
    def for_model(cls, model: str) -> ChatCodec:
        """The codec of a model directory or hub name: its tokenizer and generation config's stop ids."""
        from transformers import AutoTokenizer, GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's eos alone
            eos = None
        return cls(AutoTokenizer.from_pretrained(model), [eos] if isinstance(eos, int) else eos or [])

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None, **variables: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False, **variables
            )
        except Exception as e:  # jinja's errors and a template's raise_exception() alike
            raise TemplateError(f"the chat template refuses this conversation: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def turn_text(self, ids: list[int]) -> str:
        """A sampled turn as vLLM's parsers read it: special tokens kept, the stop token left out."""
        return self.decode(ids[:-1] if ids and ids[-1] in self.stop_ids else ids)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None, **variables: Any) -> list[int]:
        """The prompt as the template renders it; `variables` (e.g. `reasoning_effort`) reach the
        template, which ignores those it does not read."""
        return self.encode(self._render(template_messages(messages), add_generation_prompt=True, tools=tools, **variables))

    def template_uses(self, variable: str) -> bool:
        """Whether the chat template reads `variable` (so a setting of that name changes prompts)."""
        import jinja2
        from jinja2 import meta

        source = self.tokenizer.chat_template
        return isinstance(source, str) and variable in meta.find_undeclared_variables(jinja2.Environment().parse(source))

    def _turn_end(self, rendered: str) -> int:
        """Where the first assistant turn after the stub's generation header ends in `rendered`
        (just past its stop token)."""
        if not rendered.startswith(self._header):
            raise TemplateError("the chat template renders the assistant header differently from its generation prompt")
        found = [(rendered.find(t, len(self._header)), t) for t in self._stop_texts]
        found = [(i, t) for i, t in found if i >= 0]
        if not found:
            raise TemplateError(f"the chat template ends an assistant turn with none of the stop tokens {self._stop_texts}")
        i, text = min(found)
        return i + len(text)

    def turn_end_ids(self, calls: list[dict]) -> list[int]:
        """The stop token the template ends a turn making `calls` with: what closes a turn that
        max_tokens cut off after its calls."""
        rendered = self._render(_STUB_USER + [{"role": "assistant", "content": "", "tool_calls": calls}], add_generation_prompt=False)
        end = self._turn_end(rendered)
        return self.encode(next(t for t in self._stop_texts if rendered[:end].endswith(t)))

    def observation_ids(self, calls: list[dict], outputs: list[str]) -> list[int]:
        """Ids that follow the end of an assistant turn that made `calls` (OpenAI `tool_calls`):
        the tool results, then the next assistant header, exactly as the template renders them."""
        assistant = {"role": "assistant", "content": "", "tool_calls": calls}
        results = [
            {"role": "tool", "content": out, "tool_call_id": call["id"], "name": call["function"]["name"]}
            for call, out in zip(calls, outputs, strict=True)
        ]
        rendered = self._render(_STUB_USER + [assistant] + results, add_generation_prompt=True)
        return self.encode(rendered[self._turn_end(rendered) :])

    def assistant_ids(self, message: dict) -> list[int]:
        """Ids of one assistant turn as the policy would sample them, through its stop token."""
        rendered = self._render(_STUB_USER + [message], add_generation_prompt=False)
        return self.encode(rendered[len(self._header) : self._turn_end(rendered)])

    def conversation_ids(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
        """A finished agent conversation (prompt, then assistant turns and tool results) as ids
        and a loss mask that is 1 on assistant tokens — laid out exactly as a rollout is."""
        messages = template_messages(messages)
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        ids = self.prompt_ids(messages[:first], tools)
        mask = [0] * len(ids)
        i = first
        while i < len(messages):
            message = messages[i]
            if message["role"] != "assistant":
                raise ValueError(f"message {i}: expected an assistant turn, got {message['role']!r}")
            calls = message.get("tool_calls") or []
            turn = self.assistant_ids(message)
            ids += turn
            mask += [1] * len(turn)
            i += 1
            outputs = []
            while i < len(messages) and messages[i]["role"] == "tool":
                outputs.append(messages[i]["content"])
                i += 1
            if outputs:
                if len(calls) != len(outputs):
                    raise ValueError(f"message {first}: {len(outputs)} tool results follow {len(calls)} tool calls")
                obs = self.observation_ids(calls, outputs)
                ids += obs
                mask += [0] * len(obs)
        return ids, mask


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-format messages as a chat template takes them (and as vLLM's server hands them to
    one): each assistant call's `arguments` a mapping, not a JSON string (Qwen3-Coder's template
    iterates it), and an id where it has none. ValueError for arguments that are not JSON."""
    return [{**m, "tool_calls": [_call(c, n) for n, c in enumerate(m["tool_calls"])]} if m.get("tool_calls") else m
            for m in messages]


def _call(call: dict, n: int) -> dict:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args)
    return {"id": call.get("id") or f"call{n:04d}x", "type": "function", "function": {"name": fn["name"], "arguments": args}}
