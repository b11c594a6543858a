"""Builds a small Qwen2-style causal LM and tokenizer offline, saved in HF format.

Nothing downloads: the byte-level BPE tokenizer is trained here with `tokenizers` on text
shaped like what the agent sees (chat markup, JSON tool calls, numbers, English), and the
weights are randomly initialised. The result loads through exactly the code path a hub model
takes (`AutoTokenizer` / `AutoModelForCausalLM` / vLLM), so nothing else in the system knows it
is tiny. The chat template follows the Qwen2.5 / Hermes tool-calling format: tool schemas in the
system turn, calls as `<tool_call>{json}</tool_call>`, results as `<tool_response>` blocks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (Path(__file__).parent / "tiny_chat_template.jinja").read_text()

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5 keeps these as single (non-special) added tokens, so the model emits them atomically.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

_WORDS = (
    "the a of to and in is what was which how many much for on with by from at as be this that "
    "use tool tools call function answer question account balance revenue income expense quarter "
    "year company report total net profit loss cash assets search list cat lookup file directory "
    "number value name description parameters type object string integer properties required "
    "result error not found please then final reply user assistant system you are an agent"
).split()


def _training_corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Synthetic text covering chat markup, JSON, identifiers and digits (for good merges)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        ident = f"{rng.choice(['ACC', 'CO', 'Q', 'FY'])}-{rng.randint(0, 9999):04d}"
        args = json.dumps({"name": rng.choice(["lookup", "search", "list", "cat"]), "arguments": {"query": ident}})
        num = f"{rng.randint(0, 10**rng.randint(1, 7))}"
        lines.append(
            f"<|im_start|>user\n{words.capitalize()}? {ident}<|im_end|>\n<|im_start|>assistant\n"
            f"<tool_call>\n{args}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
            f"{ident} {words} {num}.{rng.randint(0, 99):02d}\n</tool_response><|im_end|>\n"
            f"The answer is {num}."
        )
    return lines


def build_tokenizer(seed: int = 0, vocab_size: int = 2048):
    """Trains a byte-level BPE tokenizer and wraps it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # One token per digit, as Qwen's and Llama's tokenizers do: numbers are copied digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + MARKUP_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 768,
    vocab_size: int = 2048,
    max_position_embeddings: int = 4096,
) -> Path:
    """Writes config, weights (safetensors, fp32), tokenizer and chat template to `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, vocab_size)
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
        rope_theta=10000.0,
        torch_dtype="float32",
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
