"""The token codec: prompts, tool observations and demonstrations laid out as the engine sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rft_cluster.chat import ChatCodec, TemplateError

CALL = {"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"account": "ACC-0137"})}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the balance of ACC-0137?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "ACC-0137 balance: 4521"},
    {"role": "assistant", "content": "It is 4521."},
]


@pytest.fixture(scope="module")
def codec(tiny_model_dir: Path) -> ChatCodec:
    return ChatCodec(AutoTokenizer.from_pretrained(tiny_model_dir))


def test_conversation_ids_match_the_template_and_mask_only_assistant_turns(codec: ChatCodec) -> None:
    ids, mask = codec.conversation_ids(CONVERSATION, None)
    rendered = codec.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # The template closes the last turn with a newline the policy never samples; all else matches.
    assert codec.decode(ids) == rendered.rstrip("\n")
    trained = codec.decode([i for i, m in zip(ids, mask) if m])
    assert trained == '<tool_call>\n{"name": "lookup", "arguments": {"account": "ACC-0137"}}\n</tool_call><|im_end|>It is 4521.<|im_end|>'
    assert "4521\n</tool_response>" in codec.decode([i for i, m in zip(ids, mask) if not m])


def test_an_observation_follows_the_turn_that_made_the_calls(codec: ChatCodec) -> None:
    """Tool results are rendered after the structured assistant turn that made them, and start
    right after that turn's stop token (what the engine stopped on)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": {"account": "ACC-0137"}}}
    obs = codec.decode(codec.observation_ids([call], ["ACC-0137 balance: 4521"]))
    assert obs == "\n<|im_start|>user\n<tool_response>\nACC-0137 balance: 4521\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert codec.decode(codec.turn_end_ids([call])) == "<|im_end|>"
    # A turn's text for the parsers leaves its stop token out, whatever the turn holds.
    assert codec.turn_text(codec.encode("It is 4521.<|im_end|>")) == "It is 4521."
    assert codec.turn_text(codec.encode("cut off mid")) == "cut off mid"


def test_the_stop_tokens_of_the_generation_config_end_a_turn(tiny_model_dir: Path) -> None:
    """A template whose turns end with a token other than the tokenizer's eos (Llama's
    <|eot_id|> beside <|end_of_text|>) is followed through the generation config's eos ids."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "<|eot|>")
    with pytest.raises(TemplateError, match="none of the stop tokens"):
        ChatCodec(tok).assistant_ids({"role": "assistant", "content": "hi"})
    codec = ChatCodec(tok, [tok.convert_tokens_to_ids("<|eot|>")])
    assert codec.decode(codec.assistant_ids({"role": "assistant", "content": "hi"})) == "hi<|eot|>"


def test_a_conversation_the_template_refuses_is_a_template_error(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    refuse = "{%- for m in messages %}{%- if m.role == 'tool' %}{{ raise_exception('one call per turn') }}{%- endif %}{%- endfor %}"
    tok.chat_template = refuse + tok.chat_template
    with pytest.raises(TemplateError, match="one call per turn"):
        ChatCodec(tok).observation_ids([CALL | {"id": "call_1"}], ["4521"])


def test_reasoning_effort_reaches_a_template_that_reads_it(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = ChatCodec(tok)
    user = [{"role": "user", "content": "hi"}]
    # A template without the variable: the setting changes nothing, and the codec says so.
    assert not plain.template_uses("reasoning_effort")
    assert plain.prompt_ids(user, None, reasoning_effort="high") == plain.prompt_ids(user, None)
    tok.chat_template = "{%- if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}\n{%- endif %}" + tok.chat_template
    codec = ChatCodec(tok)
    assert codec.template_uses("reasoning_effort")
    assert codec.decode(codec.prompt_ids(user, None, reasoning_effort="high")).startswith("Reasoning: high")
    assert not codec.decode(codec.prompt_ids(user, None)).startswith("Reasoning")
