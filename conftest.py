"""Shared test fixtures and helpers, built offline: real tokenizers (byte-level BPE,
SentencePiece-style), tiny random causal LMs, a tiny model folder for train.py runs, and the
one-line input error a bad file must give."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
)

from cli import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the test models are tiny: one thread is as fast and shares a busy machine fairly
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Let me check the sum. 12 + 30 = 42, so the answer is \\boxed{42}.",
    "Wait, that is wrong. Let's try a different approach: break it into parts.",
    "First, we can see that 7 * 6 = 42. But wait, let me verify: 6 * 7 = 42.",
    "Alternatively, consider the case where x = 3. Then 3 + 4 = 7.",
    "Question: what is 2 + 2? Answer: 4. Please reason step by step.",
]


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: the leading space belongs to the next token)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Mistral-style BPE tokenizer: "▁" marks a word boundary, one is prepended to the
    text and decoding strips it. Its vocabulary has "so" but not "▁so", so "so wait" encodes as
    "▁", "so", "▁wait"."""
    pieces = ["<unk>", *"▁abcdefghijklmnopqrstuvwxyz.,"]
    merges = [("s", "o"), ("w", "a"), ("wa", "i"), ("wai", "t"), ("▁", "wait"), ("▁", "w"),
              ("▁w", "e")]
    vocab = {piece: i for i, piece in enumerate(pieces + [a + b for a, b in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    metaspace = dict(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(**metaspace)
    tokenizer.decoder = decoders.Metaspace(**metaspace)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def build_model(tokenizer, architecture: str = "llama", seed: int = 0):
    """A tiny random causal LM over `tokenizer`'s vocabulary, in eval mode, float32."""
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,  # a GSM8K prompt with few-shot examples fits
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()
    return LlamaForCausalLM(LlamaConfig(**sizes)).eval()


@pytest.fixture()
def model(tokenizer):
    return build_model(tokenizer)


TINY_PROBLEMS = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)}
                 for a, b in [(2, 2), (3, 4), (12, 30), (5, 6)]]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as an HF folder (model/), plus a 4-problem JSONL
    file (train.jsonl). One per test module: a module may add files of its own to the folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_PROBLEMS))
    return folder


def tiny_args(folder, out, *extra):
    """train.py's flags for a short run on `folder` (a tiny_model_dir) into `out`, then `extra`."""
    return [
        "--model", str(folder / "model"), "--data", str(folder / "train.jsonl"),
        "--eval-data", str(folder / "train.jsonl"), "--grams", "paper", "--prompts-per-step", "2",
        "--group-size", "2", "--max-new-tokens", "6", "--micro-batch-size", "3",
        "--eval-every", "0", "--out", str(out), *extra,
    ]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line_input_error(path, content: str, read) -> str:
    """Write `content` to `path`; `read(str(path))` must then raise an InputError of one line that
    names the file. Returns its message."""
    path.write_text(content)
    with pytest.raises(InputError) as error:
        read(str(path))
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    return message


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (a real model)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a real model (SmolLM2), up to minutes on a busy machine; run with --run-slow",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are skipped unless --run-slow: the default suite stays within a few minutes
    on 2 cores."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
