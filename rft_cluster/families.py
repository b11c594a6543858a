"""The chat and tool-call formats a tiny model can be built in (`make-tiny-model --family`).

Each family is a published model line's format: its chat template (`templates/<name>.jinja`,
written to match the published one), its control and markup tokens (single tokens, as in the
real vocabularies), the tokens generation stops on, and the names of vLLM's parsers that read
its tool calls and reasoning back. A tiny model in a family exercises the same rendering and
parsing code paths a real checkpoint of that family does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # the Jinja chat template
    special_tokens: tuple[str, ...]  # control tokens; the first is the pad and document separator
    markup_tokens: tuple[str, ...]  # single added, non-special tokens (kept when decoding skips special ones)
    bos_token: str | None
    eos_token: str
    stop_tokens: tuple[str, ...]  # what generation stops on (generation_config.eos_token_id)
    tool_call_parser: str  # vLLM's --tool-call-parser
    reasoning_parser: str | None  # vLLM's --reasoning-parser
    description: str


def _family(name: str, **fields: object) -> Family:
    return Family(name=name, template=(_TEMPLATES / f"{name}.jinja").read_text(), **fields)  # type: ignore[arg-type]


_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_TOOLS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def _chatml(name: str, stop_tokens: tuple[str, ...], tool_call_parser: str, description: str,
            markup_tokens: tuple[str, ...] = _QWEN_TOOLS, reasoning_parser: str | None = None) -> Family:
    """A Qwen-line family: ChatML turns ending with <|im_end|>, no bos."""
    return _family(name, special_tokens=_CHATML, markup_tokens=markup_tokens, bos_token=None, eos_token="<|im_end|>",
                   stop_tokens=stop_tokens, tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                   description=description)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _chatml("hermes", ("<|im_end|>",), "hermes",
                "Qwen2.5 / Hermes: ChatML, <tool_call>{json}</tool_call>, <tool_response> results"),
        _chatml("qwen3", ("<|im_end|>", "<|endoftext|>"), "hermes",
                "Qwen3 hybrid thinking: Qwen2.5's tool calls plus <think> reasoning (enable_thinking)",
                markup_tokens=_QWEN_TOOLS + ("<think>", "</think>"), reasoning_parser="qwen3"),
        _family(
            "llama3",
            special_tokens=(
                "<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
            ),
            markup_tokens=(),
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
            tool_call_parser="llama3_json",
            reasoning_parser=None,
            description='Llama 3.1 / 3.2: header turns, tools in the first user message, {"name", "parameters"} JSON calls, ipython results',
        ),
        _family(
            "mistral",
            special_tokens=(
                "<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]",
            ),
            markup_tokens=(),
            bos_token="<s>",
            eos_token="</s>",
            stop_tokens=("</s>",),
            tool_call_parser="mistral",
            reasoning_parser=None,
            description="Mistral Small 3.2 / Ministral (tokenizer v11+): [INST], [TOOL_CALLS]name[ARGS]{json}, [TOOL_RESULTS]",
        ),
        _chatml("qwen3_coder", ("<|im_end|>", "<|endoftext|>"), "qwen3_coder",
                "Qwen3-Coder: XML calls <tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>"),
    )
}


def get_family(name: str) -> Family:
    """The family named `name`; a ValueError that lists them otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
