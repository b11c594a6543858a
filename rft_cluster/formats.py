"""How a model writes tool calls and reasoning: vLLM's own parsers, chosen by name or from the
chat template, and a check for turns that look like calls the chosen parser did not read.

Each turn is parsed exactly as `vllm serve --tool-call-parser X --reasoning-parser Y` parses a
chat completion (`ParserManager.get_parser(...)`, one parser per turn, `parse` and
`count_reasoning_tokens` on the sampled text and ids), so a family vLLM serves is a family a
rollout reads. The sampled ids are never changed: parsing only decides what to execute.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# vLLM 0.32's registered names (`ToolParserManager` / `ReasoningParserManager`), listed here so a
# job is validated without importing vLLM (seconds); tests/test_formats.py checks them against it.
TOOL_CALL_PARSERS = (
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4",
    "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4", "gigachat3", "glm45", "glm47", "granite",
    "granite-20b-fc", "granite4", "hermes", "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling", "internlm", "jamba",
    "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat",
    "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse_glimmer", "olmo3", "openai", "phi4_mini_json",
    "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss", "step3", "step3p5",
    "xlam",
)
REASONING_PARSERS = (
    "cohere_command3", "cohere_command4", "deepseek_r1", "deepseek_v3", "deepseek_v4", "deepseek_v41", "ernie45",
    "gemma4", "glm45", "glm47", "granite", "granite_thinking_parser", "hf", "holo2", "hunyuan_a13b", "hy_v3", "hy_v4",
    "inkling", "k2_horizon", "kimi_k2", "kimi_k3", "ling3", "mimo", "minicpmv", "minimax_m2", "minimax_m2_append_think",
    "minimax_m3", "mistral", "muse_glimmer", "nemotron_v3", "olmo3", "openai_gptoss", "plamo3", "poolside_v1", "qwen3",
    "seed_oss", "step3", "step3p5",
)

# Text that marks one family's tool calls, in a chat template and in model output, and the
# parser that reads it. First match wins, so a marker another family's template also holds
# comes after the more specific ones (Qwen3-Coder's template has `<tool_call>` too).
CALL_MARKERS: tuple[tuple[str, str], ...] = (
    ("to=functions.", "openai"),  # gpt-oss (harmony): a message addressed to a function
    ("[TOOL_CALLS]", "mistral"),
    ("<function=", "qwen3_coder"),
    ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
    ("<|tool_calls_section_begin|>", "kimi_k2"),
    ("<arg_key>", "glm45"),
    ("<|header_start|>", "llama4_pythonic"),
    ("<|python_tag|>", "llama3_json"),
    ("ipython<|end_header_id|>", "llama3_json"),
    ("<tool_call>", "hermes"),
)
# A JSON object with a "name" key: how JSON-calling families (Llama 3, Phi-4) write a call bare.
_JSON_CALL = re.compile(r'\{\s*"name"\s*:\s*"')


def known_parser(name: str, kind: str, known: tuple[str, ...], ours: tuple[str, ...] = ("auto",)) -> str:
    """`name` if vLLM knows it or it is one of `ours`, else a ValueError listing them all."""
    if name in ours or name in known:
        return name
    raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(ours + known)}")


def call_like(text: str) -> str | None:
    """The parser that would read `text` as a tool call when it looks like one, else None."""
    for marker, parser in CALL_MARKERS:
        if marker in text:
            return parser
    return "llama3_json" if _JSON_CALL.search(text) else None


def choose_tool_call_parser(template: str) -> str:
    """The tool-call parser a chat template's own call syntax needs; ValueError when it shows none.
    A harmony template (gpt-oss) is known by its channels: it builds the call's recipient in parts."""
    for marker, parser in (("<|channel|>", "openai"),) + CALL_MARKERS:
        if marker in template:
            return parser
    raise ValueError(
        "cannot tell the tool-call format from the model's chat template; set cluster.engine.tool_call_parser "
        f"to one of: {', '.join(TOOL_CALL_PARSERS)}"
    )


def local_chat_template(model_dir: Path) -> str | None:
    """The chat template saved in a local model directory (transformers 5's `chat_template.jinja`,
    or the `chat_template` of an older `tokenizer_config.json`), or None."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def choose_reasoning_parser(template: str, generation_prompt: str) -> str:
    """The reasoning parser a chat template's thinking markup needs, or `none`. A template that
    opens `<think>` in the generation prompt (DeepSeek-R1 style) has the model write only the
    block's end, which `deepseek_r1` expects."""
    if "<|channel|>" in template:
        return "openai_gptoss"
    if "[THINK]" in template:
        return "mistral"
    if "<think>" in template:
        return "deepseek_r1" if generation_prompt.rstrip().endswith("<think>") else "qwen3"
    return "none"


@dataclass
class ParsedCall:
    """A tool call as the parser read it; `error` is set when it cannot be executed."""

    id: str
    name: str
    arguments: str  # JSON string, as the tool protocol carries it
    error: str | None = None

    def message(self) -> dict[str, Any]:
        """The call in a chat template's `tool_calls` shape (arguments as a mapping, the HF
        convention every template accepts)."""
        try:
            args = json.loads(self.arguments)
        except (ValueError, RecursionError):  # a malformed call: rendered with no arguments
            args = {}
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args if isinstance(args, dict) else {}}}


@dataclass
class ParsedTurn:
    content: str
    reasoning: str | None
    calls: list[ParsedCall] = field(default_factory=list)
    reasoning_tokens: int = 0
    # The parser read no call, yet the text looks like one: the parser likely to read it.
    unparsed_call_like: str | None = None

    def message(self) -> dict[str, Any]:
        """The turn as an assistant message a chat template renders."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.calls:
            msg["tool_calls"] = [c.message() for c in self.calls]
        return msg


class TurnParser:
    """Reads one model's turns with vLLM's parsers (`tool_call_parser`/`reasoning_parser`:
    vLLM names, `auto` to choose from the chat template, `none` for no reasoning)."""

    def __init__(self, tokenizer: Any, tool_call_parser: str = "auto", reasoning_parser: str = "auto"):
        from vllm.parser.parser_manager import ParserManager

        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.chosen = {"tool_call_parser": tool_call_parser == "auto", "reasoning_parser": reasoning_parser == "auto"}
        if tool_call_parser == "auto":
            tool_call_parser = choose_tool_call_parser(template)
        if reasoning_parser == "auto":
            header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
            reasoning_parser = choose_reasoning_parser(template, header)
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = None if reasoning_parser == "none" else reasoning_parser
        self.tokenizer = tokenizer
        self._cls = ParserManager.get_parser(
            tool_parser_name=tool_call_parser,
            reasoning_parser_name=self.reasoning_parser,
            enable_auto_tools=True,
            is_harmony=tool_call_parser == "openai",
            tokenizer=tokenizer,
        )
        # A call the parser cannot read is counted and shown to the model as malformed: the
        # parser's own traceback for it would only bury the run's output.
        for name in ("vllm.tool_parsers", "vllm.parser"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._own_marker = next((m for m, p in CALL_MARKERS if p == tool_call_parser), None)

    def describe(self) -> dict[str, str]:
        """The parsers in use, for the run's one log line: {"tool_call_parser": "hermes", ...}."""
        return {"tool_call_parser": self.tool_call_parser, "reasoning_parser": self.reasoning_parser or "none",
                "chosen": ", ".join(k for k, auto in self.chosen.items() if auto)}

    def request(self, messages: list[dict], tools: list[dict], template_kwargs: dict[str, Any] | None = None) -> Any:
        """The chat request one rollout's turns are parsed against (its tools type the arguments)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest(model="policy", messages=messages, tools=tools or None, chat_template_kwargs=template_kwargs)

    def parse(self, text: str, ids: list[int], prompt_ids: list[int], request: Any) -> ParsedTurn:
        """One turn: `text` the sampled ids decoded, special tokens kept, the stop token left out."""
        from vllm.renderers.chat_utils import make_tool_call_id

        parser = self._cls(self.tokenizer, request.tools, chat_template_kwargs=request.chat_template_kwargs or {})
        parser.set_prompt_token_ids(prompt_ids)
        failure = None
        try:
            reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True, model_output_token_ids=ids)
            reasoning_tokens = parser.count_reasoning_tokens(ids)
        except Exception as e:  # noqa: BLE001 - model output is untrusted: a parser that chokes on it ends no run
            reasoning, content, calls, reasoning_tokens = None, text, [], 0
            failure = f"the {self.tool_call_parser} parser failed on this turn: {type(e).__name__}: {str(e)[:200]}"
        turn = ParsedTurn((content or "").strip(), reasoning, reasoning_tokens=reasoning_tokens)
        for call in calls or []:
            turn.calls.append(_checked(ParsedCall(call.id or make_tool_call_id(), call.name or "", call.arguments or "")))
        if not turn.calls:
            # The text itself, not the content: some parsers drop call markup they cannot read.
            # Reasoning is left out: a model may think about a call it does not make.
            acted = text.split(reasoning, 1)[-1] if reasoning else text
            turn.unparsed_call_like = call_like(acted)
            # The model's own call syntax that its parser could not read: shown to the model as a
            # malformed call (as a server would fail it), not taken for the final answer.
            if self._own_marker is not None and self._own_marker in acted:
                raw = acted[acted.index(self._own_marker):]
                why = failure or f"the {self.tool_call_parser} parser could not read this tool call"
                turn.calls.append(ParsedCall(make_tool_call_id(), "", raw[:2000], why))
        return turn


def _checked(call: ParsedCall) -> ParsedCall:
    if not call.name:
        call.error = "tool call names no function"
        return call
    try:
        args = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError) as e:  # bad JSON, too deep, a number past Python's digit limit
        call.error = f"tool call arguments are not valid JSON: {str(e)[:200]}"
        return call
    if not isinstance(args, dict):
        call.error = "tool call arguments must be a JSON object"
    return call
