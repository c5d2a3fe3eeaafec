"""A small byte-level BPE tokenizer, trained on a built-in text, so synthetic checkpoints take text prompts."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"

_CORPUS = """\
Mixture-of-experts models route every token to a few experts out of many.
Only the chosen experts' weights are needed, so the rest can stay on the disk.
A streaming engine reads the routed experts from the SSD for each token and keeps hot ones in RAM.
The expert cache holds the experts used most often; the page cache holds what the kernel chose.
Prefetching reads the experts of the next layers before the model asks for them.
A good predictor guesses the next layer's experts from the current hidden state.
Quantization makes each expert smaller, so fewer bytes cross the bus for every token.
The tuner tries cache sizes, prefetch depths and block sizes, and measures tokens per second.
Every trial is logged, and the best configuration is exported for this machine.
The quick brown fox jumps over the lazy dog while the model decodes one token at a time.
"""


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of at most ``vocab_size`` tokens (fewer if the text runs out of merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tokenizer
