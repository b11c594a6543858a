"""Tool-call and reasoning formats: vLLM's parsers on each family's turns, `auto`, and the turns
that look like a call the chosen parser did not read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rft_cluster.chat import ChatCodec, TemplateError
from rft_cluster.families import FAMILIES
from rft_cluster.formats import (
    REASONING_PARSERS, TOOL_CALL_PARSERS, TurnParser, call_like, choose_reasoning_parser, choose_tool_call_parser,
)
from rft_cluster.metrics import format_metrics
from rft_cluster.precheck import verdict
from rft_cluster.tiny_model import build_tokenizer
from rft_cluster.types import Trajectory

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up one account.",
        "parameters": {"type": "object", "properties": {"account": {"type": "string"}}, "required": ["account"]},
    },
}
QUESTION = [{"role": "user", "content": "What is the balance of ACC-0137?"}]


def call(account: str, n: int = 0) -> dict:
    return {"id": f"call{n:04d}x", "type": "function", "function": {"name": "lookup", "arguments": {"account": account}}}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, ChatCodec, TurnParser]:
    tok = build_tokenizer(0, family=request.param)
    return request.param, ChatCodec(tok), TurnParser(tok)


def sampled(codec: ChatCodec, message: dict) -> list[int]:
    """An assistant turn's ids as the model would sample them: the template's own rendering."""
    return codec.assistant_ids(message)


def parse(codec: ChatCodec, parser: TurnParser, ids: list[int]):
    return parser.parse(codec.turn_text(ids), ids, codec.prompt_ids(QUESTION, [LOOKUP]), parser.request(QUESTION, [LOOKUP]))


def test_the_parser_names_are_the_ones_vllm_registers() -> None:
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    assert TOOL_CALL_PARSERS == tuple(ToolParserManager.list_registered())
    assert REASONING_PARSERS == tuple(sorted(ReasoningParserManager.list_registered()))


def test_auto_chooses_each_familys_parsers_from_its_template(family) -> None:
    name, _, parser = family
    fam = FAMILIES[name]
    assert (parser.tool_call_parser, parser.reasoning_parser) == (fam.tool_call_parser, fam.reasoning_parser)
    assert parser.describe()["chosen"] == "tool_call_parser, reasoning_parser"


def test_auto_names_the_choices_when_the_template_shows_no_call_format() -> None:
    with pytest.raises(ValueError, match="set cluster.engine.tool_call_parser to one of: .*hermes.*llama3_json"):
        choose_tool_call_parser("{% for m in messages %}{{ m.content }}{% endfor %}")
    # A template that opens the reasoning block in the prompt wants the parser that expects only its end.
    assert choose_reasoning_parser("<think>", "<|Assistant|><think>\n") == "deepseek_r1"
    assert choose_reasoning_parser("<think>", "<|im_start|>assistant\n") == "qwen3"
    assert choose_reasoning_parser("plain", "") == "none"


def test_one_call_is_read_with_its_name_and_arguments(family) -> None:
    _, codec, parser = family
    turn = parse(codec, parser, sampled(codec, {"role": "assistant", "content": "", "tool_calls": [call("ACC-0137")]}))
    assert [(c.name, json.loads(c.arguments), c.error) for c in turn.calls] == [("lookup", {"account": "ACC-0137"}, None)]
    assert turn.unparsed_call_like is None and turn.calls[0].id


def test_parallel_calls_are_read_in_order_or_refused_by_a_one_call_template(family) -> None:
    name, codec, parser = family
    message = {"role": "assistant", "content": "", "tool_calls": [call("ACC-0137", 0), call("ACC-0042", 1)]}
    if name == "llama3":
        # Llama writes parallel calls ";"-separated, its parser reads them, and its 3.1 template
        # refuses to render them back: the rollout ends format_failed (graded) on this error.
        ids = codec.encode('{"name": "lookup", "parameters": {"account": "ACC-0137"}}; '
                           '{"name": "lookup", "parameters": {"account": "ACC-0042"}}<|eot_id|>')
    else:
        ids = sampled(codec, message)
    turn = parse(codec, parser, ids)
    assert [json.loads(c.arguments)["account"] for c in turn.calls] == ["ACC-0137", "ACC-0042"]
    if name == "llama3":
        with pytest.raises(TemplateError, match="single tool-calls"):
            codec.observation_ids([c.message() for c in turn.calls], ["4521", "77"])
        return
    obs = codec.decode(codec.observation_ids([c.message() for c in turn.calls], ["4521", "77"]))
    assert obs.index("4521") < obs.index("77")


def test_a_call_after_reasoning_is_read_and_the_reasoning_counted(family) -> None:
    name, codec, parser = family
    thought = "The user wants ACC-0137, so I look it up."
    ids = sampled(codec, {"role": "assistant", "content": "", "reasoning_content": thought, "tool_calls": [call("ACC-0137")]})
    turn = parse(codec, parser, ids)
    assert [c.name for c in turn.calls] == ["lookup"]
    if FAMILIES[name].reasoning_parser is None:
        assert turn.reasoning_tokens == 0
        return
    assert turn.reasoning.strip() == thought
    # The thought's own tokens, the block's markers not counted.
    assert turn.reasoning_tokens == len(codec.encode("\n" + thought + "\n"))


def test_a_malformed_call_in_the_models_own_format_is_shown_to_it_as_malformed(family) -> None:
    name, codec, parser = family
    broken = {"hermes": "<tool_call>\n{not json}\n</tool_call>", "qwen3": "<tool_call>\n{not json}\n</tool_call>",
              "llama3": "<|python_tag|>{not json", "mistral": "[TOOL_CALLS]lookup[ARGS]{not json",
              "qwen3_coder": "<tool_call>\n<function=>\n</function>\n</tool_call>"}[name]
    turn = parse(codec, parser, codec.encode(broken))
    # Either the parser read a call whose arguments do not parse, or it read none: then the turn
    # counts as call-like, in the model's own format.
    assert turn.calls and all(c.error for c in turn.calls), turn
    if turn.unparsed_call_like is None:
        assert [(c.name, "arguments are not valid JSON" in c.error) for c in turn.calls] == [("lookup", True)]
    else:
        assert turn.unparsed_call_like == FAMILIES[name].tool_call_parser


def test_an_answer_without_a_call_is_the_final_answer(family) -> None:
    _, codec, parser = family
    turn = parse(codec, parser, sampled(codec, {"role": "assistant", "content": "The balance is 4521."}))
    assert (turn.content, turn.calls, turn.unparsed_call_like) == ("The balance is 4521.", [], None)


@pytest.mark.parametrize(
    "text, likely",
    [
        ('<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>', "hermes"),
        ('{"name": "lookup", "parameters": {"account": "ACC-1"}}', "llama3_json"),
        ("[TOOL_CALLS]lookup[ARGS]{}", "mistral"),
        ("<tool_call>\n<function=lookup>\n</function>\n</tool_call>", "qwen3_coder"),
        ("The balance is 4521.", None),
    ],
)
def test_text_that_looks_like_another_familys_call_names_its_parser(text: str, likely: str | None) -> None:
    assert call_like(text) == likely


def test_a_wrong_parser_is_counted_and_precheck_says_no_go_naming_the_right_one() -> None:
    """A Llama-format model read with the hermes parser: every call is ignored, and said so."""
    tok = build_tokenizer(0, family="llama3")
    codec, parser = ChatCodec(tok), TurnParser(tok, tool_call_parser="hermes", reasoning_parser="none")
    turn = parse(codec, parser, sampled(codec, {"role": "assistant", "content": "", "tool_calls": [call("ACC-0137")]}))
    assert turn.calls == [] and turn.unparsed_call_like == "llama3_json"
    trajs = [Trajectory(f"t{i}", "p", f"g{i // 2}", 1, [1], [0], [0.0], [-1], 1, "", score=0.0, reward=0.0,
                        unparsed_call_like=[turn.unparsed_call_like] if i < 3 else []) for i in range(4)]
    figures = format_metrics(trajs)
    assert figures == {"format/unparsed_call_like": 3.0, "format/unparsed_call_like_rollouts_frac": 0.75,
                       "format/unparsed_call_like/llama3_json": 3.0}
    v = verdict({"rollouts": 4.0, "graded": 4.0, "reward_mean": 0.5, "groups_no_signal_frac": 0.0, **figures}, 2, "hermes")
    assert not v.ok and "tool_call_parser: llama3_json" in v.reason


def test_validate_refuses_an_unknown_parser_naming_the_known_ones(tmp_path: Path) -> None:
    from rft_cluster.config import SpecError, load_job

    job = tmp_path / "job.yaml"
    job.write_text(
        "model: m\ntraining_file: t.jsonl\nmethod:\n  type: reinforcement\n  reinforcement:\n"
        "    grader: {type: string_check, name: g, input: '{{sample.output_text}}', reference: '{{item.a}}', operation: eq}\n"
        "cluster:\n  engine:\n    tool_call_parser: hermes2\n"
    )
    with pytest.raises(SpecError) as e:
        load_job(job)
    [problem] = e.value.problems
    assert problem.startswith(f"{job}:9: cluster.engine.tool_call_parser: unknown tool_call_parser 'hermes2'")
    assert "llama3_json" in problem and "qwen3_coder" in problem


def test_validate_says_when_auto_cannot_tell_a_local_models_call_format(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rft_cluster.dataset import check_job_and_data

    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": QUESTION, "answer": "1"}) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: model\ntraining_file: train.jsonl\nmethod:\n  type: reinforcement\n  reinforcement:\n"
        "    grader: {type: string_check, name: g, input: '{{sample.output_text}}', reference: '{{item.answer}}', operation: eq}\n"
        "    hyperparameters: {batch_size: 1}\n"
    )
    model = tmp_path / "model"  # a model validate can load (config, tokenizer), its template replaced
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    [problem] = check_job_and_data(job)[0]
    assert problem.startswith(f"{job}:") and "cluster.engine.tool_call_parser: cannot tell the tool-call format" in problem
    (model / "chat_template.jinja").write_text(FAMILIES["mistral"].template)
    assert check_job_and_data(job)[0] == []
    # A hub name (no such directory) is checked when its engines start, not here.
    job.write_text(job.read_text().replace("model: model", "model: org/some-model"))
    assert check_job_and_data(job)[0] == []


class HarmonyTokenizer:
    """gpt-oss's o200k_harmony ids through openai_harmony, which ships the encoding: vLLM's
    harmony parser reads token ids, so the real ids are what this checks. (An HF tokenizer of
    gpt-oss, and so a tiny gpt-oss model and its chat template, cannot be built offline here.)"""

    chat_template = "{{- '<|start|>' }}{%- for m in messages %}{{ m.content }}{% endfor %}<|channel|>"

    def __init__(self) -> None:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding

        self.encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)

    def get_vocab(self) -> dict[str, int]:
        return {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.encoding.decode(ids)

    def apply_chat_template(self, messages: list[dict], **_: object) -> str:
        return "<|start|>assistant"


def test_gpt_oss_harmony_calls_and_reasoning_are_read_from_its_token_ids() -> None:
    tok = HarmonyTokenizer()
    parser = TurnParser(tok)
    assert (parser.tool_call_parser, parser.reasoning_parser) == ("openai", "openai_gptoss")
    request = parser.request(QUESTION, [LOOKUP])
    thought = "<|channel|>analysis<|message|>I look up ACC-0137.<|end|><|start|>assistant"
    calling = thought + '<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"account": "ACC-0137"}'
    turn = parser.parse(calling, tok.encode(calling + "<|call|>"), [], request)
    assert [(c.name, json.loads(c.arguments), c.error) for c in turn.calls] == [("lookup", {"account": "ACC-0137"}, None)]
    # vLLM counts a call's commentary-channel tokens as reasoning too (its usage accounting).
    assert turn.reasoning == "I look up ACC-0137." and turn.reasoning_tokens > len(tok.encode("I look up ACC-0137."))
    answering = thought + "<|channel|>final<|message|>It is 4521."
    turn = parser.parse(answering, tok.encode(answering + "<|return|>"), [], request)
    assert (turn.content, turn.calls, turn.unparsed_call_like) == ("It is 4521.", [], None)
    assert turn.reasoning_tokens == len(tok.encode("I look up ACC-0137."))  # the analysis channel, not the answer


def test_a_template_that_drops_reasoning_from_history_keeps_what_the_engine_saw() -> None:
    """A template that shows reasoning on the last turn only (DeepSeek-R1 / QwQ style) renders
    an earlier turn without it once later turns exist. The rollout's ids keep the reasoning the
    engine sampled and conditioned on, and each observation is still exactly what the template
    puts after that turn."""
    tok = build_tokenizer(0, family="qwen3")
    tok.chat_template = tok.chat_template.replace("{%- if loop.index0 > ns.last_query_index %}", "{%- if loop.last %}")
    codec, parser = ChatCodec(tok), TurnParser(tok)
    first = {"role": "assistant", "content": "", "reasoning_content": "I look it up.", "tool_calls": [call("ACC-0137")]}
    final = {"role": "assistant", "content": "It is 4521.", "reasoning_content": "The tool said so."}
    turn1 = sampled(codec, first)
    assert parse(codec, parser, turn1).reasoning_tokens > 0
    observation = codec.observation_ids(first["tool_calls"], ["4521"])
    ids = codec.prompt_ids(QUESTION, [LOOKUP]) + turn1 + observation + sampled(codec, final)
    conversation = QUESTION + [first, {"role": "tool", "content": "4521", "tool_call_id": "call0000x"}, final]
    rendered = tok.apply_chat_template(conversation, tools=[LOOKUP], tokenize=False)
    assert "I look it up." in codec.decode(ids) and "I look it up." not in rendered
    # Re-rendering would train on a context the engine never saw; the observation is the template's.
    before, obs, after = rendered.partition(codec.decode(observation))
    assert obs and before.endswith("<|im_end|>") and after.startswith("<think>\nThe tool said so.")


def test_a_parser_that_raises_on_a_turn_makes_it_a_malformed_call_not_a_dead_rollout(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer(0)
    codec, parser = ChatCodec(tok), TurnParser(tok)

    def boom(*_: object, **__: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(parser._cls, "parse", boom)
    turn = parse(codec, parser, codec.encode("<tool_call>\n" + "[" * 5000 + "\n</tool_call>"))
    [bad] = turn.calls
    assert "hermes parser failed on this turn: RecursionError" in bad.error and turn.unparsed_call_like == "hermes"
    assert parse(codec, parser, codec.encode("It is 4521.")).content == "It is 4521."
