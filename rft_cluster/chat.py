"""Token-level chat codec: prompts and tool observations as token ids, tool calls parsed out.

Token-in/token-out: the trajectory is built by appending ids, never by re-tokenizing the whole
conversation. Tool observations are rendered with the model's own chat template as a *delta*:
the template is applied to a fixed stub conversation with and without the tool messages, and the
text after the stub assistant turn's end-of-turn token is tokenized. This works for any template
in which an assistant turn ends with the tokenizer's eos token (Qwen2.5/Qwen3/Hermes style).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_STUB_USER = [{"role": "user", "content": "x"}]
_STUB = _STUB_USER + [{"role": "assistant", "content": "y"}]


@dataclass
class ParsedCall:
    """A tool call as the model wrote it; `error` is set when it cannot be executed."""

    name: str
    arguments: str  # JSON string, as the tool protocol carries it
    error: str | None = None


class ChatCodec:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        eos_text = tokenizer.eos_token
        prefix = self._render(_STUB, add_generation_prompt=False)
        if eos_text not in prefix:
            raise ValueError(
                f"the chat template does not end assistant turns with the eos token {eos_text!r}; "
                "token-exact tool observations need that"
            )
        self._stub_prefix = prefix[: prefix.rindex(eos_text) + len(eos_text)]
        self._eos_text = eos_text
        self._stub_header = self._render(_STUB_USER, add_generation_prompt=True)
        # Reasoning models (Qwen3, DeepSeek-R1 style) mark thoughts with single <think> tokens.
        vocab = tokenizer.get_vocab()
        self._think = (vocab["<think>"], vocab["</think>"]) if "<think>" in vocab and "</think>" in vocab else None

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None, **variables: Any) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False, **variables
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None, reasoning_effort: str | None = None) -> list[int]:
        """The prompt as the template renders it; `reasoning_effort` reaches the template as the
        variable of that name (gpt-oss style), which templates without it ignore."""
        extra = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
        return self.encode(self._render(messages, add_generation_prompt=True, tools=tools, **extra))

    def template_uses(self, variable: str) -> bool:
        """Whether the chat template reads `variable` (so a setting of that name changes prompts)."""
        import jinja2
        from jinja2 import meta

        source = self.tokenizer.chat_template
        return isinstance(source, str) and variable in meta.find_undeclared_variables(jinja2.Environment().parse(source))

    def observation_ids(self, outputs: list[str]) -> list[int]:
        """Ids that follow an assistant turn's eos: the tool results, then the next assistant
        header, exactly as the template would render them."""
        tool_msgs = [{"role": "tool", "content": o} for o in outputs]
        full = self._render(_STUB + tool_msgs, add_generation_prompt=True)
        if not full.startswith(self._stub_prefix):
            raise ValueError("the chat template renders earlier turns differently once tool results follow")
        return self.encode(full[len(self._stub_prefix) :])

    def assistant_ids(self, message: dict) -> list[int]:
        """Ids of one assistant turn as the policy would sample them, through its eos."""
        full = self._render(_STUB_USER + [message], add_generation_prompt=False)
        if not full.startswith(self._stub_header):
            raise ValueError("the chat template renders the assistant header differently from its generation prompt")
        text = full[len(self._stub_header) :]
        return self.encode(text[: text.index(self._eos_text)]) + [self.eos_id]

    def conversation_ids(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
        """A finished agent conversation (prompt, then assistant turns and tool results) as ids
        and a loss mask that is 1 on assistant tokens — laid out exactly as a rollout is."""
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        ids = self.prompt_ids(messages[:first], tools)
        mask = [0] * len(ids)
        i = first
        while i < len(messages):
            if messages[i]["role"] != "assistant":
                raise ValueError(f"message {i}: expected an assistant turn, got {messages[i]['role']!r}")
            turn = self.assistant_ids(messages[i])
            ids += turn
            mask += [1] * len(turn)
            i += 1
            outputs = []
            while i < len(messages) and messages[i]["role"] == "tool":
                outputs.append(messages[i]["content"])
                i += 1
            if outputs:
                obs = self.observation_ids(outputs)
                ids += obs
                mask += [0] * len(obs)
        return ids, mask

    def reasoning_tokens(self, ids: list[int]) -> int:
        """Sampled tokens inside <think>...</think> (a template may open the block in the
        prompt, so a close without an open counts everything before it)."""
        if self._think is None:
            return 0
        open_id, close_id = self._think
        if close_id in ids and open_id not in ids:
            return ids.index(close_id)
        count, inside = 0, False
        for t in ids:
            if t in self._think:
                inside = t == open_id
            elif inside:
                count += 1
        return count

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """Splits an assistant turn into its visible content and its `<tool_call>` blocks; a
    reasoning block (`...</think>`) is neither content nor calls."""
    text = text.rsplit("</think>", 1)[-1]
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as e:
            calls.append(ParsedCall("", block, f"tool call is not valid JSON: {e.msg}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ParsedCall("", block, 'tool call needs {"name": <string>, "arguments": <object>}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit the arguments already encoded
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ParsedCall(obj["name"], json.dumps(args), "tool call arguments must be a JSON object"))
            continue
        calls.append(ParsedCall(obj["name"], json.dumps(args)))
    content = text.split("<tool_call>", 1)[0].strip()
    return content, calls
