"""Build a tiny random-weight Qwen2 chat model and tokenizer, offline, in a couple of seconds.

For tests, benchmarks and smoke tests: nothing is downloaded. The model is a 2-layer Qwen2
(hidden 64) with random weights; the tokenizer is a byte-level BPE (about 480 tokens) trained on
a small built-in English corpus, with Qwen2's ChatML chat template (no default system message).

    python -m worker.tiny_model OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

VOCAB_SIZE = 480  # 256 byte symbols + 3 special tokens + ~220 merges
MAX_POSITIONS = 2048

# Qwen2's ChatML template without the default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BUILTIN_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can learn to answer short questions.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
You are a helpful assistant. Please answer the question. Thank you for your help, that was useful.
The weather today is sunny and warm, with a light wind from the west in the afternoon.
Machine learning models are trained on data; they learn patterns and then make predictions.
A language model predicts the next token given the tokens before it in the sentence.
Fine-tuning adapts a pretrained model to a new task with a smaller set of examples.
Low-rank adapters add a few trainable weights to each layer while the base model stays frozen.
The user asks a question and the assistant gives an answer. The system sets the instructions.
Hello! How are you? I am fine, thanks. Where do you live? I live in a small town near the sea.
Numbers: zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 2026.
Write a short poem about the moon. The moon is bright tonight, it shines over the quiet hills.
Translate this sentence into French. Summarize the following text in one line. Explain why.
Yes, no, maybe, always, never, sometimes, often, because, however, therefore, although.
The job is queued, then running, and then it has succeeded, failed or been cancelled.
Once upon a time there was a little girl who lived in a village near the forest with her mother.
Every morning she walked to the river to fetch water, and every evening she read her books.
The teacher asked the students to open their books and read the first chapter out loud.
Cats and dogs are common pets. Some people keep birds, fish, rabbits or even snakes at home.
Good morning, good afternoon, good evening, good night. See you tomorrow, have a nice day!
Which color do you like best: red, green, blue, yellow, orange, purple, black or white?
Python is a programming language. Write a function that returns the sum of a list of numbers.
The train leaves the station at nine in the morning and arrives in the city before noon.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
People should drink enough water, sleep well, eat fresh food and walk outside every day.
"""


def _train_tokenizer(texts: Sequence[str]) -> Tokenizer:
    """A byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder.

    The pipeline matches `transformers`' `Qwen2Tokenizer`, which `AutoTokenizer` rebuilds from
    the vocab and merges for any `model_type == "qwen2"` directory: what we train is what loads.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token_id
    return token_id


def build_tiny_model(out_dir: Path, *, vocab_corpus: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Write a tiny random Qwen2 causal LM and its tokenizer into `out_dir`; return `out_dir`.

    `vocab_corpus`: extra texts the BPE is trained on besides the built-in corpus (so your
    data tokenizes into fewer tokens). The result is deterministic for a given seed and corpus.
    """
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    texts = _BUILTIN_CORPUS.splitlines()
    if vocab_corpus is not None:
        texts.extend(vocab_corpus)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(texts),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    pad_id = _token_id(tokenizer, PAD_TOKEN)
    eos_id = _token_id(tokenizer, IM_END)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=pad_id,  # as in Qwen2: bos is <|endoftext|>, never prepended
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tiny_model",
        description="Write a tiny random Qwen2 chat model and tokenizer (offline).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
