"""Shared test fixtures: real tokenizers (byte-level BPE, SentencePiece-style) and tiny random causal LMs, built offline."""

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the test models are tiny: one thread is as fast and shares a busy machine fairly

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
        tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>", chat_template=CHAT_TEMPLATE
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Mistral-style BPE tokenizer: "▁" marks a word boundary, one is prepended to the text and
    decoding strips it. Its vocabulary has "so" but not "▁so", so "so wait" encodes as "▁", "so", "▁wait"."""
    pieces = ["<unk>", *"▁abcdefghijklmnopqrstuvwxyz.,"]
    merges = [("s", "o"), ("w", "a"), ("wa", "i"), ("wai", "t"), ("▁", "wait"), ("▁", "w"), ("▁w", "e")]
    vocab = {piece: i for i, piece in enumerate(pieces + [a + b for a, b in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (a real model)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a real model (SmolLM2), up to minutes on a busy machine; run with --run-slow")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are skipped unless --run-slow: the default suite stays within a few minutes on 2 cores."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
