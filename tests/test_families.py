"""`make-tiny-model --family`: each family renders its published chat and tool-call format, its
markers are single tokens, and vLLM's own parser for the family reads the calls back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rft_cluster.families import FAMILIES, Family
from rft_cluster.tiny_model import build_tokenizer, make_tiny_model

TOOLS = [
    {"type": "function", "function": {"name": "lookup", "description": "Look up an account.", "parameters": {
        "type": "object", "properties": {"account": {"type": "string", "description": "the id"}}, "required": ["account"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the ledger.", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Balance of ACC-1?"}]
LOOKUP = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": {"account": "ACC-1"}}}
SEARCH = {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": {"query": "ACC-1 balance"}}}


def _call_turn(*calls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": list(calls), **extra}


def _conversation(**call_extra: Any) -> list[dict[str, Any]]:
    """A question, one call, its result and the answer."""
    return [*QUESTION, _call_turn(LOOKUP, **call_extra),
            {"role": "tool", "content": "ACC-1 balance: 42", "tool_call_id": "call_1"}, {"role": "assistant", "content": "42"}]


# Per family, what the published format writes for `_conversation()`, in this order.
EXPECTED = {
    "hermes": [
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call functions. Their signatures are within <tools></tools>:\n<tools>\n{",
        '<|im_start|>user\nBalance of ACC-1?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "lookup", "arguments": {"account": "ACC-1"}}\n</tool_call><|im_end|>\n',
        "<|im_start|>user\n<tool_response>\nACC-1 balance: 42\n</tool_response><|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n",
    ],
    "qwen3": [
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{",
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
        '<|im_start|>user\nBalance of ACC-1?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "lookup", "arguments": {"account": "ACC-1"}}\n</tool_call><|im_end|>\n',
        # the last assistant turn after the query always gets a (here empty) think block
        "<|im_start|>user\n<tool_response>\nACC-1 balance: 42\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n42<|im_end|>\n",
    ],
    "llama3": [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a function call with its "
        'proper arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
        'argument name and its value}.Do not use variables.\n\n{\n    "type": "function",\n    "function": {\n        "name": "lookup",',
        "}\n\nBalance of ACC-1?<|eot_id|>",
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "lookup", "parameters": {"account": "ACC-1"}}<|eot_id|>',
        "<|start_header_id|>ipython<|end_header_id|>\n\nACC-1 balance: 42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n42<|eot_id|>",
    ],
    "mistral": [
        '<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{"type": "function", "function": {"name": "lookup",',
        '[/AVAILABLE_TOOLS][INST]Balance of ACC-1?[/INST][TOOL_CALLS]lookup[ARGS]{"account": "ACC-1"}</s>',
        "[TOOL_RESULTS]ACC-1 balance: 42[/TOOL_RESULTS]42</s>",
    ],
    "qwen3_coder": [
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n<function>\n<name>lookup</name>\n"
        "<description>Look up an account.</description>\n<parameters>\n<parameter>\n<name>account</name>\n<type>string</type>\n"
        "<description>the id</description>\n</parameter>\n",
        "</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n",
        "<|im_start|>user\nBalance of ACC-1?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n<function=lookup>\n<parameter=account>\nACC-1\n</parameter>\n</function>\n</tool_call><|im_end|>\n",
        "<|im_start|>user\n<tool_response>\nACC-1 balance: 42\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n",
    ],
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[Family, Any]:
    return FAMILIES[request.param], build_tokenizer(0, family=request.param)


def _render(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, **kwargs)


def _in_order(text: str, parts: list[str]) -> None:
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} not found after position {at} in:\n{text}"
        at = found + len(part)


def test_the_published_format_in_order(family: tuple[Family, Any]) -> None:
    fam, tok = family
    _in_order(_render(tok, _conversation()), EXPECTED[fam.name])
    assert set(EXPECTED) == set(FAMILIES)


def test_calls_may_be_bare_and_arguments_json_strings(family: tuple[Family, Any]) -> None:
    fam, tok = family
    reference = _render(tok, _conversation())
    bare = _conversation()
    bare[2]["tool_calls"] = [LOOKUP["function"]]  # {name, arguments} without the OpenAI envelope
    assert _render(tok, bare) == reference
    if fam.name != "qwen3_coder":  # its XML needs the mapping (Jinja cannot parse JSON); callers pass a dict
        as_string = _conversation()
        as_string[2]["tool_calls"] = [{**LOOKUP, "function": {"name": "lookup", "arguments": json.dumps({"account": "ACC-1"})}}]
        assert _render(tok, as_string) == reference


def test_markers_are_single_tokens(family: tuple[Family, Any]) -> None:
    fam, tok = family
    markers = [*fam.special_tokens, *fam.markup_tokens]
    assert tok.convert_tokens_to_ids(markers) == list(range(len(markers)))  # `_examples` samples ids after them
    for marker in markers:
        assert tok.encode(f"a{marker}b", add_special_tokens=False)[1:-1] == [tok.convert_tokens_to_ids(marker)], marker
    # Markup survives skip_special_tokens (vLLM's default detokenisation), control tokens do not.
    for marker in markers:
        kept = tok.decode(tok.encode(marker, add_special_tokens=False), skip_special_tokens=True)
        assert kept == (marker if marker in fam.markup_tokens else ""), marker
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (fam.bos_token, fam.eos_token, fam.special_tokens[0])
    assert set(fam.stop_tokens) <= set(fam.special_tokens) and fam.eos_token in fam.stop_tokens


def _sampled(fam: Family, tok: Any, turn: dict[str, Any], **kwargs: Any) -> tuple[str, list[int]]:
    """The assistant turn as the model samples it: after the generation prompt, up to the stop token."""
    prompt = _render(tok, QUESTION, add_generation_prompt=True, **kwargs)
    full = _render(tok, [*QUESTION, turn], **kwargs)
    assert full.startswith(prompt)
    ids = tok.encode(full[len(prompt):], add_special_tokens=False)
    stops = set(tok.convert_tokens_to_ids(list(fam.stop_tokens)))
    ids = ids[: next(i for i, t in enumerate(ids) if t in stops)]
    return tok.decode(ids, skip_special_tokens=False), ids


def _vllm_parse(fam: Family, tok: Any, text: str, ids: list[int]) -> tuple[str | None, str | None, list[tuple[str, Any]]]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager

    cls = ParserManager.get_parser(tool_parser_name=fam.tool_call_parser, reasoning_parser_name=fam.reasoning_parser,
                                   enable_auto_tools=True, tokenizer=tok)
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    parser = cls(tok, req.tools)
    reasoning, content, calls = parser.parse(text, req, enable_auto_tools=True, model_output_token_ids=ids)
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls or []]


def test_vllm_parses_a_single_call(family: tuple[Family, Any]) -> None:
    fam, tok = family
    text, ids = _sampled(fam, tok, _call_turn(LOOKUP))
    _, content, calls = _vllm_parse(fam, tok, text, ids)
    assert calls == [("lookup", {"account": "ACC-1"})]
    assert not (content or "").strip()


def test_vllm_parses_parallel_calls(family: tuple[Family, Any]) -> None:
    fam, tok = family
    if fam.name == "llama3":  # Llama 3.1's template refuses them, as published
        with pytest.raises(Exception, match="only supports single tool-calls"):
            _render(tok, [*QUESTION, _call_turn(LOOKUP, SEARCH)])
        return
    text, ids = _sampled(fam, tok, _call_turn(LOOKUP, SEARCH))
    assert _vllm_parse(fam, tok, text, ids)[2] == [("lookup", {"account": "ACC-1"}), ("search", {"query": "ACC-1 balance"})]


def test_qwen3_reasoning_before_a_call() -> None:
    fam, tok = FAMILIES["qwen3"], build_tokenizer(0, family="qwen3")
    text, ids = _sampled(fam, tok, _call_turn(LOOKUP, reasoning_content="The ledger has it."))
    assert text.startswith("<think>\nThe ledger has it.\n</think>\n\n<tool_call>\n")
    reasoning, content, calls = _vllm_parse(fam, tok, text, ids)
    assert (reasoning or "").strip() == "The ledger has it."
    assert calls == [("lookup", {"account": "ACC-1"})] and not (content or "").strip()
    # Reasoning before the last real query is dropped; tool results do not count as queries.
    earlier = [*QUESTION, {"role": "assistant", "content": "Hello.", "reasoning_content": "old thought"}, {"role": "user", "content": "And ACC-2?"},
               _call_turn(LOOKUP, reasoning_content="new thought"), {"role": "tool", "content": "7"}]
    rendered = _render(tok, earlier, add_generation_prompt=True)
    assert "old thought" not in rendered and "<|im_start|>assistant\nHello.<|im_end|>" in rendered
    assert "<|im_start|>assistant\n<think>\nnew thought\n</think>\n\n<tool_call>" in rendered
    assert _render(tok, QUESTION, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_mistral_alternation_and_tools_before_the_last_query() -> None:
    tok = build_tokenizer(0, family="mistral")
    two_turns = [*QUESTION, {"role": "assistant", "content": "Which ledger?"}, {"role": "user", "content": "The main one."}]
    rendered = _render(tok, two_turns)
    assert "[INST]Balance of ACC-1?[/INST]Which ledger?</s>[AVAILABLE_TOOLS][" in rendered
    assert rendered.endswith("[/AVAILABLE_TOOLS][INST]The main one.[/INST]")
    with pytest.raises(Exception, match="must alternate"):
        _render(tok, [*QUESTION, {"role": "user", "content": "again"}])


def test_qwen3_coder_content_before_calls_and_grouped_results() -> None:
    tok = build_tokenizer(0, family="qwen3_coder")
    turn = {"role": "assistant", "content": "Let me check.", "tool_calls": [LOOKUP, SEARCH]}
    results = [{"role": "tool", "content": "A", "tool_call_id": "call_1"}, {"role": "tool", "content": "B", "tool_call_id": "call_2"}]
    rendered = _render(tok, [*QUESTION, turn, *results])
    assert "<|im_start|>assistant\nLet me check.\n\n<tool_call>\n<function=lookup>\n" in rendered
    assert "</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=query>\nACC-1 balance\n</parameter>\n" in rendered
    assert rendered.endswith("<|im_start|>user\n<tool_response>\nA\n</tool_response>\n<tool_response>\nB\n</tool_response>\n<|im_end|>\n")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_model_loads_and_stops_on_the_family_stop_tokens(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = FAMILIES[name]
    # The copy circuit needs 2+ layers, 4 heads over 2 kv heads and head_dim >= 56: hidden 256 is the floor
    # in practice. One pre-training step runs `_examples` over the family's conversations.
    out = make_tiny_model(tmp_path / name, family=name, num_layers=2, intermediate_size=256, pretrain_steps=1,
                          pretrain_batch_size=2, pretrain_seq_len=128)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.convert_ids_to_tokens(model.generation_config.eos_token_id) == list(fam.stop_tokens)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids(fam.eos_token)
    assert model.config.bos_token_id == (tok.convert_tokens_to_ids(fam.bos_token) if fam.bos_token else None)
    assert tok.chat_template == fam.template
    for marker in fam.markup_tokens:  # non-special after the save and load too
        assert tok.decode(tok.encode(marker, add_special_tokens=False), skip_special_tokens=True) == marker
