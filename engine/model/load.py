"""Load a checkpoint directory into a runnable model: decoder, expert store and tokenizer."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer

from engine.architectures import parse_config
from engine.compute import kernels
from engine.config import EngineConfig
from engine.errors import CheckpointError
from engine.formats.checkpoint import Checkpoint, drop_cached_pages, read_json
from engine.formats.weights import weights_dir
from engine.model.decoder import Decoder, build_decoder

TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"


@dataclass
class Model:
    path: Path
    decoder: Decoder
    tokenizer: Tokenizer | None  # when the checkpoint ships tokenizer.json
    eos_token_ids: frozenset[int]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise CheckpointError(self.path, f"has no {TOKENIZER_FILE}; pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str | None:
        """Text for ``ids``, or None when the checkpoint has no tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def drop_cached_pages(self) -> bool:
        """Evict every file the engine reads for this model from the page cache: the checkpoint's shards and
        the expert files (a repacked copy's ``experts.bin``); False where the OS cannot be asked."""
        checkpoint = self.decoder.checkpoint
        if not checkpoint.drop_cached_pages():
            return False
        layouts = self.decoder.store.layouts.values()
        for path in sorted({r.path for layout in layouts for r in layout.byte_ranges} - set(checkpoint.fds)):
            fd = os.open(path, os.O_RDONLY)
            try:
                drop_cached_pages(fd)
            finally:
                os.close(fd)
        return True

    def close(self) -> None:
        self.decoder.store.close()
        self.decoder.checkpoint.close()


def load_model(path: str | Path, config: EngineConfig = EngineConfig()) -> Model:
    """The checkpoint at ``path`` ready to run with ``config`` (its ``weights`` repacked first if asked)."""
    path = weights_dir(path, config.weights, config.group_size)
    checkpoint = Checkpoint.open(path)
    try:
        spec = parse_config(checkpoint.config, path / "config.json")
        if config.top_k is not None:
            if config.top_k > spec.top_k:
                raise ValueError(f"top_k {config.top_k} exceeds the model's {spec.top_k} active experts ({path})")
            spec = dataclasses.replace(spec, top_k=config.top_k)
        if config.compute_threads is not None:
            set_compute_threads(config.compute_threads)
        decoder = build_decoder(spec, checkpoint, config)
        tokenizer = _load_tokenizer(path / TOKENIZER_FILE)
        eos = set(spec.eos_token_ids) | _generation_eos(path / GENERATION_CONFIG)
    except BaseException:
        checkpoint.close()
        raise
    return Model(path, decoder, tokenizer, frozenset(eos))


def set_compute_threads(threads: int) -> None:
    """Limit BLAS (for the whole process) and the fused kernels (for the calling thread) to ``threads``."""
    if threads > kernels.max_threads():
        raise ValueError(f"compute_threads {threads} exceeds the {kernels.max_threads()} threads this machine offers")
    threadpool_limits(threads, user_api="blas")
    kernels.set_threads(threads)


def _load_tokenizer(path: Path) -> Tokenizer | None:
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
        raise CheckpointError(path, f"not a valid tokenizers file: {e}") from None


def _generation_eos(path: Path) -> set[int]:
    if not path.exists():
        return set()
    eos = read_json(path).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(path, f"expected an integer or a list of integers, got {eos!r}", field="eos_token_id")
    return set(ids)
