"""Builds a small Qwen2-style causal LM and tokenizer offline, saved in HF format.

Nothing downloads: the byte-level BPE tokenizer is trained here with `tokenizers` on the user's
own material (`--corpus`: the job's datasets, demonstrations with their tool outputs, any text;
`Corpus`) plus synthetic tool-use conversations, and the weights get a short pre-training on
both. The builder knows no environment: the demo hands it its files like any user. The result
loads through exactly the code path a hub model takes (`AutoTokenizer` / `AutoModelForCausalLM`
/ vLLM), so nothing else in the system knows it is tiny. The chat template, control tokens and
stop tokens are those of a published model family (`families.py`); the default, `hermes`, is the
Qwen2.5 / Hermes tool-calling format: tool schemas in the system turn, calls as
`<tool_call>{json}</tool_call>`, results as `<tool_response>` blocks.

Why a copy circuit and pre-training: a randomly initialised model warm-started by SFT on a few
hundred demonstrations learns the procedure but not to copy an identifier or a number from its
context (it emits the most common digits), so RL would get no signal. Real LLMs copy trivially
(induction heads), and minutes of CPU training do not grow one, so `_copy_circuit` sets one into
the first two layers; the pre-training (random token strings repeated after a separator, and
tool-use conversations whose calls and answers repeat identifiers and numbers that appear once
earlier, with names and labels taken from the material, and the material itself) then fits
the rest of the model around it.
"""

from __future__ import annotations

import json
import math
import random
import time
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft_cluster.chat import template_messages
from rft_cluster.families import Family, get_family

_WORDS = (
    "the a of to and in is what was were which how many much for on with by from at as be this that "
    "use tool tools call function answer question account balance revenue income expense expenses "
    "operating quarter year company report reports quarterly total net profit loss cash assets headcount "
    "search list cat lookup read find file directory path number value name description parameters "
    "type object string integer properties required result error not found please then final reply "
    "user assistant system you are an agent USD millions except first line item period"
).split()
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOOL_NAMES = ("lookup", "search", "list", "cat", "read", "fetch", "get_balance", "query", "find", "open")
_ARG_KEYS = ("account", "path", "query", "id", "name", "file", "company", "ticker", "key")
_LABELS = ("balance", "revenue", "net income", "cash", "headcount", "operating expenses", "price", "total", "count")
_PREFIXES = ("ACC", "INV", "ORD", "SKU", "CO", "ID", "TX", "EMP", "FY", "Q")

# The copy circuit (`_copy_circuit`): a token's code width for matching, the fast RoPE pairs that
# fix layer 0's offsets and the score at the offset, the scale of layer 1's content q and k, the
# gain of the copied embedding, the final norm weight that keeps unit-scale logits moderate, and
# the recency preference among several matches (~3 nats per 100 tokens).
_CODE = 10
_POS_PAIRS = 12
_POS_GAIN = 48.0
_MATCH_GAIN = 1.5
_COPY_GAIN = 4.0
_LOGIT_SCALE = 0.05
_TWIN_SHARE = 0.6
_RECENCY_GAIN = 20.0

# Pre-training defaults: 2-4 min on 2 CPU cores. Short rows keep attention cheap; the copy
# distances the agent needs (a few hundred tokens) are within what the rows' offsets teach.
PRETRAIN_STEPS = 100
PRETRAIN_BATCH = 12
PRETRAIN_SEQ_LEN = 384
PRETRAIN_LR = 3e-3
# The vocabulary's ceiling (merges stop earlier on a small corpus), and the synthetic
# conversations added to the tokenizer's text for the markup.
MAX_VOCAB = 8192
SYNTHETIC_TOKENIZER_LINES = 1000


def _number(rng: random.Random) -> str:
    """An integer or a decimal, as tool outputs print them."""
    n = rng.randint(0, 10 ** rng.randint(1, 6))
    sign = "-" if rng.random() < 0.1 else ""
    return sign + (f"{n}.{rng.randint(0, 9)}" if rng.random() < 0.5 else str(n))


def _code(rng: random.Random) -> str:
    """An opaque id like ACC-0137."""
    prefix = rng.choice(_PREFIXES) if rng.random() < 0.7 else "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(3))
    width = rng.randint(3, 6)
    return f"{prefix}-{rng.randrange(10**width):0{width}d}"


def _renderer(fam: Family) -> Any:
    """Renders conversations with the family's chat template; rendering needs no vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()), chat_template=fam.template, bos_token=fam.bos_token, eos_token=fam.eos_token
    )


# What synthetic conversations borrow from the user's material: ids and paths ("SKU-01234",
# "acme/2019/Q3.txt"), capitalised names of up to four words, and "Label: <number>" line labels.
_IDENTIFIER = re.compile(r"\b[A-Za-z][\w.]*(?:[-/][\w.]+)+\b")
_NAME = re.compile(r"\b[A-Z][a-z]+(?: [A-Z0-9][\w-]*){0,3}")
_LABEL = re.compile(r"^[ \t-]*([A-Za-z][A-Za-z ]{1,30}?)[ \t]*:[ \t]*-?\$?\d", re.MULTILINE)


@dataclass
class Corpus:
    """The user's material as the model will see it: each JSONL row with `messages` (dataset rows,
    demonstrations with their tool outputs) rendered by the `family`'s chat template, each other line or
    text file as it is; and what the synthetic pre-training conversations draw from it (its
    identifiers, names, line labels, tool names and argument keys)."""

    documents: list[str] = field(default_factory=list)
    identifiers: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    tools: list[tuple[str, str]] = field(default_factory=list)  # (tool name, its first argument key)
    family: str = "hermes"

    @classmethod
    def from_files(cls, files: Iterable[str | Path], family: str = "hermes") -> Corpus:
        renderer, documents, plain = _renderer(get_family(family)), [], []
        tools: dict[str, str] = {}
        for file in files:
            path = Path(file)
            if not path.is_file():
                raise ValueError(f"--corpus {path}: no such file")
            text = path.read_text()
            if path.suffix != ".jsonl":
                documents += [p for p in text.split("\n\n") if p.strip()]
                plain.append(text)
                continue
            for n, line in enumerate(text.splitlines(), start=1):
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                    continue
                try:
                    messages = template_messages(row["messages"])
                    documents.append(renderer.apply_chat_template(messages, tools=row.get("tools") or None, tokenize=False))
                except Exception as e:  # noqa: BLE001 - jinja raises several kinds; name the row
                    raise ValueError(f"{path}:{n}: the chat template cannot render this row: {e}") from None
                plain += [m["content"] for m in row["messages"] if isinstance(m.get("content"), str)]
                for tool in row.get("tools") or []:
                    fn = tool.get("function", {})
                    keys = list(fn.get("parameters", {}).get("properties", {}))
                    if fn.get("name") and keys:
                        tools.setdefault(fn["name"], keys[0])
        joined = "\n".join(plain)
        identifiers = sorted(set(_IDENTIFIER.findall(joined)) | set(_NAME.findall(joined)))
        labels = sorted({m.strip().lower() for m in _LABEL.findall(joined)})
        return cls(documents, identifiers, labels, sorted(tools.items()), family)


class _Text:
    """Seeded generator of the synthetic text (shared by the tokenizer corpus and pre-training)."""

    def __init__(self, seed: int, corpus: Corpus, fam: Family):
        self.rng = random.Random(f"tiny-text-{seed}")
        self.corpus = corpus
        self.family = fam

    def identifier(self) -> str:
        ids = self.corpus.identifiers
        return self.rng.choice(ids) if ids and self.rng.random() < 0.8 else _code(self.rng)

    def label(self) -> str:
        labels = self.corpus.labels
        return self.rng.choice(labels) if labels and self.rng.random() < 0.8 else self.rng.choice(_LABELS)

    def tool(self, name: str, key: str) -> dict[str, Any]:
        rng = self.rng
        description = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."
        prop: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.5:
            prop["description"] = f"{key} id, e.g. {self.identifier()}"
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {"type": "object", "properties": {key: prop}, "required": [key], "additionalProperties": False},
            },
        }

    def conversation(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(messages, tools): a question naming an identifier, a tool call repeating it, a tool
        result with the asked value, and an answer repeating the value."""
        rng = self.rng
        own = self.corpus.tools
        pairs = rng.sample(own, min(len(own), rng.randint(1, 2))) if own and rng.random() < 0.7 else \
            [(n, rng.choice(_ARG_KEYS)) for n in rng.sample(_TOOL_NAMES, rng.randint(1, 2))]
        names, keys = [n for n, _ in pairs], [k for _, k in pairs]
        tools = [self.tool(n, k) for n, k in pairs]
        ident, label = self.identifier(), self.label()
        value = _number(rng)
        question = rng.choice((
            f"What is the {label} of {ident}?",
            f"Look up {ident} and tell me its {label}.",
            f"{label.capitalize()} for {ident}, please.",
            f"What was the {label} of {ident}? Use the {names[0]} tool, then answer with the number.",
        ))
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.7:
            messages.append({"role": "system", "content": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "."})
        messages.append({"role": "user", "content": question})
        call = {"type": "function", "function": {"name": names[0], "arguments": {keys[0]: ident}}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call], **self.reasoning(f"I need the {label} of {ident}.")})
        if rng.random() < 0.5:
            result = f"{ident} {label}: {value}"
        else:  # several lines, only one of them asked about: copy the value after the asked label
            lines = [f"{self.label().capitalize()}: {_number(rng)}" for _ in range(4)]
            lines = [line for line in lines if not line.lower().startswith(label + ":")]
            lines.insert(rng.randint(0, len(lines)), f"{label.capitalize()}: {value}")
            result = "\n".join([f"{ident} report"] + lines)
        messages.append({"role": "tool", "content": result})
        answer = rng.choice((f"The {label} of {ident} is {value}.", f"{label.capitalize()}: {value}", value))
        messages.append({"role": "assistant", "content": answer, **self.reasoning(f"The tool says {value}.")})
        return messages, tools

    def reasoning(self, thought: str) -> dict[str, str]:
        """Half the time in a family with a reasoning format, a short `reasoning_content`, so the
        tokenizer and the pre-training see its blocks; nothing (and no draw) otherwise."""
        if self.family.reasoning_parser is None or self.rng.random() < 0.5:
            return {}
        return {"reasoning_content": thought}

    def tokenizer_lines(self, n: int) -> Iterator[str]:
        """Text for BPE training: the user's documents, then `n` synthetic conversations (for the
        chat and tool-call markup whatever the material holds)."""
        renderer = _renderer(self.family)
        yield from self.corpus.documents
        for _ in range(n):
            messages, tools = self.conversation()
            yield renderer.apply_chat_template(messages, tools=tools, tokenize=False)


def build_tokenizer(seed: int = 0, vocab_size: int = MAX_VOCAB, corpus: Corpus | None = None, family: str = "hermes"):
    """Trains a byte-level BPE tokenizer on the corpus and wraps it as a transformers fast
    tokenizer with the family's chat template and control tokens. Merges stop at pairs seen fewer
    than twice, so `vocab_size` is a ceiling: every word the material repeats becomes one token (a
    pre-token never spans words, so no longer), as in a real LLM's vocabulary, and a small corpus
    gives a small vocabulary. `corpus` must come from `Corpus.from_files(..., family)`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = get_family(family)
    corpus = corpus or Corpus(family=family)
    if corpus.family != family:
        raise ValueError(f"the corpus was rendered for the {corpus.family} family, not {family}")
    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer: one token per digit (numbers are copied digit by digit), a
    # punctuation mark may lead a word ("-robotics") and trailing newlines join punctuation ("/\n").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*fam.special_tokens, *fam.markup_tokens],  # ids 0.. in this order (`_examples`)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_Text(seed, corpus, fam).tokenizer_lines(SYNTHETIC_TOKENIZER_LINES), trainer=trainer)
    # The trainer adds every marker as special; the markup is not, as in Qwen's tokenizers, so
    # decoding with skip_special_tokens keeps `<tool_call>` and `<think>` for the parsers. (Rebuilt
    # from JSON: flipping the flag with add_tokens leaves the token in the in-memory special set.)
    state = json.loads(tok.to_str())
    for added in state["added_tokens"]:
        added["special"] = added["content"] not in fam.markup_tokens
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        bos_token=fam.bos_token,
        eos_token=fam.eos_token,
        pad_token=fam.special_tokens[0],
        unk_token=None,
        additional_special_tokens=[],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = fam.template
    return fast


def _examples(tokenizer: Any, text: _Text, seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, labels) pre-training examples; label -100 where nothing can be predicted."""
    rng = text.rng
    first_id = len(text.family.special_tokens) + len(text.family.markup_tokens)
    end = tokenizer.pad_token_id  # the family's first control token (<|endoftext|>) separates documents
    while True:
        if rng.random() < 0.5:
            # Pure induction: a random string, a separator, the same string again (only that is learned).
            span = [rng.randrange(first_id, len(tokenizer)) for _ in range(rng.randint(4, 48))]
            sep = tokenizer.encode(rng.choice(("\n", " | ", "\n\n", ": ")), add_special_tokens=False)
            ids = span + sep + span + [end]
            yield ids, [-100] * (len(span) + len(sep)) + span + [end]
        else:
            # A synthetic conversation, or (half of these, when there is material) one of the
            # user's documents: its words, tool outputs and formats in the model's context.
            documents = text.corpus.documents
            if documents and rng.random() < 0.5:
                rendered = rng.choice(documents)
            else:
                messages, tools = text.conversation()
                rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
            ids = tokenizer.encode(rendered, add_special_tokens=False)[: seq_len - 1] + [end]
            yield ids, ids


def _batches(tokenizer: Any, text: _Text, batch_size: int, seq_len: int) -> Iterator[tuple[Any, Any]]:
    """Rows of `seq_len` packed with whole examples (documents attend across; harmless)."""
    import torch

    examples = _examples(tokenizer, text, seq_len)
    pending = next(examples)
    while True:
        rows_ids, rows_labels = [], []
        for _ in range(batch_size):
            ids: list[int] = []
            labels: list[int] = []
            while len(ids) + len(pending[0]) <= seq_len:
                ids += pending[0]
                labels += pending[1]
                pending = next(examples)
            pad = seq_len - len(ids)
            rows_ids.append(ids + [tokenizer.pad_token_id] * pad)
            rows_labels.append(labels + [-100] * pad)
        yield torch.tensor(rows_ids), torch.tensor(rows_labels)


def _pretrain(model: Any, tokenizer: Any, text: _Text, steps: int, batch_size: int, seq_len: int, lr: float) -> None:
    """AdamW with linear warmup and cosine decay. A terminal shows a bar (loss, ETA) and the last
    loss; a plain console (CI logs, files), which a bar would reach only at its end, gets the loss ten times."""
    import torch
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    t0, losses = time.perf_counter(), []
    every = max(1, steps // 10)  # the loss is averaged over windows of this many steps
    console = Console()
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[loss]}"),
                  console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("tiny-model pre-training", total=steps, loss="")
        for step, (ids, labels) in zip(range(1, steps + 1), _batches(tokenizer, text, batch_size, seq_len)):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"loss {sum(losses) / len(losses):.3f}")
            if (bar.disable and step % every == 0) or step == steps:
                console.print(f"[tiny-model] pre-training step {step}/{steps}: loss {sum(losses) / len(losses):.3f} "
                              f"({time.perf_counter() - t0:.0f} s)", markup=False)
            if step % every == 0:
                losses = []
    model.eval()


def _copy_circuit(model: Any, tokenizer: Any) -> None:
    """Initialises an induction circuit, the mechanism by which LLMs copy from their context
    (Olsson et al., 2022), rather than hoping minutes of CPU training find it (they do not: the
    phase change takes far more tokens). Layer 0's heads 0-2 attend to the token 1, 2 and 3
    back (q and k are constant biases, so RoPE alone sets where the score peaks) and write those
    tokens' codes into otherwise empty residual dims. Layer 1's head 0 attends where the codes of
    the last three tokens match those of the three before a position, i.e. just after an earlier
    occurrence of the last three tokens, and writes that position's token embedding back, raising
    its logit. Three tokens, not two: in "- net income: 49.2" the pair ": " precedes every value
    of a report, "income: " only one. Embeddings are unit-scale so the circuit outweighs the small
    random init of everything else; pre-training then builds the language model around it."""
    import torch

    cfg = model.config
    hidden, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // heads
    half = head_dim // 2
    match_pairs = 3 * _CODE // 2  # three codes fill both components of these RoPE pairs
    if cfg.num_hidden_layers < 2 or heads < 4 or heads // kv_heads < 2 or _POS_PAIRS + 1 + match_pairs > half or hidden < 8 * _CODE:
        raise ValueError("the copy circuit needs 2+ layers, 4+ query heads (2+ per kv head) and a wider head_dim")
    slots = [hidden // 2 + k * hidden // 8 for k in range(3)]  # residual offsets of the codes 1, 2, 3 back
    slow = list(range(half - match_pairs, half))  # RoPE pairs that barely turn over the context
    components = slow + [pair + half for pair in slow]
    exponent = torch.arange(half, dtype=torch.float64) * 2 / head_dim
    inv_freq = 1.0 / cfg.rope_parameters["rope_theta"] ** exponent
    layer0, layer1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    # Tokens that spell the same word (" ACC" and "ACC", " Aerospace" and "-aerospace") partly share
    # the dims the circuit matches and copies, as a trained LLM's embeddings of such twins are
    # alike: a word from the question then also copies into a JSON string or a path, where its
    # token differs, while an exact repeat still scores highest.
    texts = [tokenizer.decode([i]) for i in range(cfg.vocab_size)]
    spellings = [t.lstrip(" \"'-/").lower() if "\ufffd" not in t else "" for t in texts]  # "\ufffd": a partial UTF-8 byte
    spellings = [s or i for i, s in enumerate(spellings)]  # punctuation and bytes: their own
    word = {spelling: n for n, spelling in enumerate(dict.fromkeys(spellings))}
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # tied: also the output layer
        emb.normal_(0.0, 1.0)
        emb[:, hidden // 2 :] = 0.0
        shared = torch.randn(len(word), head_dim)[[word[s] for s in spellings]]
        emb[:, :head_dim] = _TWIN_SHARE * shared + math.sqrt(1 - _TWIN_SHARE**2) * emb[:, :head_dim]
        # Layer 0 is all circuit; in layer 1, query heads 0-1 and kv head 0 start from zero.
        for attn, q_heads, kv in ((layer0, heads, kv_heads), (layer1, 2, 1)):
            for proj, rows in ((attn.q_proj, q_heads * head_dim), (attn.k_proj, kv * head_dim), (attn.v_proj, kv * head_dim)):
                proj.weight[:rows] = 0.0
                proj.bias[:rows] = 0.0
            attn.o_proj.weight[:, : q_heads * head_dim] = 0.0
        # Layer 0: one key everywhere on the fast pairs; each query rotated back by its offset.
        amp = math.sqrt(_POS_GAIN)
        fast = (torch.arange(half) < _POS_PAIRS).double() * amp
        for kv in range(kv_heads):
            layer0.k_proj.bias[kv * head_dim : kv * head_dim + half] = fast.float()
            for i in range(_CODE):  # value: the token's code (its first embedding dims)
                layer0.v_proj.weight[kv * head_dim + i, i] = 1.0
        for head, slot in enumerate(slots):
            angle = -inv_freq * (head + 1)
            layer0.q_proj.bias[head * head_dim : (head + 1) * head_dim] = torch.cat([fast * angle.cos(), fast * angle.sin()]).float()
            for i in range(_CODE):  # each head reads its kv head's value (GQA) and writes its slot
                layer0.o_proj.weight[slot + i, head * head_dim + i] = 1.0
        # Layer 1, head 0: q = codes of (this token, 1 back, 2 back); k = codes of (1, 2, 3 back).
        q_sources, k_sources = [0, slots[0], slots[1]], slots
        for n, (q_src, k_src) in enumerate(zip(q_sources, k_sources)):
            for i in range(_CODE):
                layer1.q_proj.weight[components[n * _CODE + i], q_src + i] = _MATCH_GAIN
                layer1.k_proj.weight[components[n * _CODE + i], k_src + i] = _MATCH_GAIN
        # Recency: with q = (0, a) and k = (a, 0) on a slow free pair, RoPE makes the score
        # -a^2 sin(distance * theta), nearly linear over the context, so of several matches (a wrong
        # report read before the right one) the latest wins, as in a trained LLM.
        recency = slow[0] - 1
        layer1.q_proj.bias[recency + half] = math.sqrt(_RECENCY_GAIN)
        layer1.k_proj.bias[recency] = math.sqrt(_RECENCY_GAIN)
        for i in range(head_dim):  # value: the attended token's embedding dims, written back amplified
            layer1.v_proj.weight[i, i] = 1.0
            layer1.o_proj.weight[i, i] = _COPY_GAIN
        model.model.norm.weight.fill_(_LOGIT_SCALE)


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 768,
    vocab_size: int = MAX_VOCAB,
    corpus: Iterable[str | Path] = (),
    max_position_embeddings: int = 4096,
    pretrain_steps: int = PRETRAIN_STEPS,
    pretrain_batch_size: int = PRETRAIN_BATCH,
    pretrain_seq_len: int = PRETRAIN_SEQ_LEN,
    pretrain_lr: float = PRETRAIN_LR,
    family: str = "hermes",
) -> Path:
    """Writes config, weights (safetensors, fp32), tokenizer and chat template to `out_dir`.
    `corpus`: the files the tokenizer and the pre-training learn the domain from (`Corpus`);
    without any, only generic synthetic text. `pretrain_steps=0` leaves the weights random
    (fast, for plumbing tests). `family`: the chat and tool-call format (`families.FAMILIES`)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    fam = get_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    material = Corpus.from_files(corpus, family)
    tokenizer = build_tokenizer(seed, vocab_size, material, family)
    # Round the embedding rows up to a multiple of 64, as real checkpoints do.
    n_vocab = (len(tokenizer) + 63) // 64 * 64
    config = Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,  # Qwen2's; slow pairs carry the copy circuit's content match
        torch_dtype="float32",
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    _copy_circuit(model, tokenizer)
    if pretrain_steps > 0:
        _pretrain(model, tokenizer, _Text(seed, material, fam), pretrain_steps, pretrain_batch_size, pretrain_seq_len, pretrain_lr)
    # Every token the family's checkpoints end a turn or a document with (vLLM stops on each).
    stops = tokenizer.convert_tokens_to_ids(list(fam.stop_tokens))
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
