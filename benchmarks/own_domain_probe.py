"""Where a warehouse warm start fails, before any rollout: the three copies a right answer needs,
checked greedily on the 48 validation questions with an ideal context (issue 16).

    .venv/bin/python benchmarks/own_domain_probe.py MODEL_DIR [MODEL_DIR ...] [--output FILE]

For each question the context is the one a perfect agent would have, and the model is asked to
continue from the point where it must copy:
  name    after `{"name": "` of the first `find_product` call: the product's name from the question;
  sku     after `{"sku": "` of the `stock` call: the asked product's SKU from the search listing
          (the demonstrations read look-alikes' stock first, so an imitating model may pick one);
  number  after the reply's restated question: the units on the asked warehouse's line.
Prints and writes the share of each that is exact, per model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft_cluster.envs.warehouse import SYSTEM_PROMPT, TOOLS, Question, WarehouseTools, make_catalog, split_questions
from rft_cluster.envs.warehouse.tasks import answer

from common import metadata  # benchmarks/common.py, beside this script

ENV_SEED = 0  # benchmarks/own_domain.py's world


def checks(question: Question, tools: WarehouseTools) -> list[tuple[str, list[dict[str, Any]], str, str]]:
    """(what, context messages, text forced after the generation prompt, the exact continuation)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.text}]
    out = []
    for n, (what, tool, key, value) in enumerate((("name", "find_product", "name", question.product.name), ("sku", "stock", "sku", question.product.sku))):
        out.append((what, list(messages), f'<tool_call>\n{{"name": "{tool}", "arguments": {{"{key}": "', value + '"'))
        arguments = json.dumps({key: value})
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{n}", "type": "function", "function": {"name": tool, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": f"call_{n}", "content": tools.call(tool, arguments)},
        ]
    reply = answer(question)
    out.append(("number", messages, reply[: reply.rindex(" ") + 1], str(question.answer)))
    return out


def probe(model_dir: str, questions: list[Question], tools: WarehouseTools) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right: dict[str, int] = {"name": 0, "sku": 0, "number": 0}
    for question in questions:
        for what, messages, forced, target in checks(question, tools):
            prompt = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False) + forced
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=16, do_sample=False)
            text = tokenizer.decode(out[0, ids.shape[1] :])
            # A number must end where the reference does ("29" is not "297").
            right[what] += text.startswith(target) and not (what == "number" and text[len(target) : len(target) + 1].isdigit())
    return {what: round(n / len(questions), 3) for what, n in right.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--output", default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    catalog = make_catalog(ENV_SEED)
    questions, tools = split_questions(catalog, ENV_SEED).valid, WarehouseTools(catalog)
    results = {}
    for model in args.models:
        results[model] = probe(model, questions, tools)
        print(f"{model}: exact copies of {len(questions)} — " + ", ".join(f"{k} {v:.2f}" for k, v in results[model].items()), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({**metadata(), "questions": len(questions), "models": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
