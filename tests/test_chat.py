"""The token codec: prompts, tool observations and demonstrations laid out as the engine sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from rft_cluster.chat import ChatCodec, parse_tool_calls

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


def test_a_sampled_tool_call_parses_back_to_the_call(codec: ChatCodec) -> None:
    content, calls = parse_tool_calls(codec.decode(codec.assistant_ids(CONVERSATION[2])))
    assert content == "" and [(c.name, json.loads(c.arguments), c.error) for c in calls] == [("lookup", {"account": "ACC-0137"}, None)]


@pytest.mark.parametrize(
    "text, error",
    [
        ("<tool_call>\n{not json}\n</tool_call>", "not valid JSON"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', '"name"'),
        ('<tool_call>\n{"name": "x", "arguments": [1]}\n</tool_call>', "must be a JSON object"),
    ],
)
def test_malformed_calls_carry_an_error(text: str, error: str) -> None:
    [call] = parse_tool_calls(text)[1]
    assert call.error is not None and error in call.error


def test_reasoning_tokens_are_counted_and_kept_out_of_content(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert ChatCodec(tok).reasoning_tokens(tok.encode("<think> a b </think>", add_special_tokens=False)) == 0
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    codec = ChatCodec(tok)
    thought = tok.encode("\nlet me see\n", add_special_tokens=False)
    ids = tok.encode("<think>", add_special_tokens=False) + thought + tok.encode("</think>The answer is 5.", add_special_tokens=False)
    assert codec.reasoning_tokens(ids) == len(thought)
    assert codec.reasoning_tokens(ids[1:]) == len(thought)  # the prompt opened the block
    assert parse_tool_calls(codec.decode(ids)) == ("The answer is 5.", [])


def test_reasoning_effort_reaches_a_template_that_reads_it(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = ChatCodec(tok)
    user = [{"role": "user", "content": "hi"}]
    # A template without the variable: the setting changes nothing, and the codec says so.
    assert not plain.template_uses("reasoning_effort")
    assert plain.prompt_ids(user, None, "high") == plain.prompt_ids(user, None)
    tok.chat_template = "{%- if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}\n{%- endif %}" + tok.chat_template
    codec = ChatCodec(tok)
    assert codec.template_uses("reasoning_effort")
    assert codec.decode(codec.prompt_ids(user, None, "high")).startswith("Reasoning: high")
    assert not codec.decode(codec.prompt_ids(user, None)).startswith("Reasoning")
