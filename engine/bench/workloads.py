"""Named, versioned workloads: what a benchmark feeds the model, fixed so that results stay comparable.

A workload is either ``generate`` (a prompt of ``prompt_tokens``, then ``new_tokens`` decoded, end-of-sequence
ignored) or ``score`` (teacher-forced logits over ``prompt_tokens``). Real checkpoints get a built-in English
text through their own tokenizer; synthetic checkpoints (``synth.json``) get token streams that walk their
topics, keeping the current topic with probability ``locality`` — the structure their weights route on.
Change what a workload produces and its version must change: results and cached references key on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.model.generate import Sampler
from engine.model.load import Model
from engine.synth import read_synth_info, topic_of
from engine.synth.weights import RoutingKnobs


@dataclass(frozen=True)
class Workload:
    name: str
    version: int
    kind: Literal["generate", "score"]
    prompt_tokens: int  # context before the first generated token, or the scored length
    new_tokens: int  # generated tokens (0 for score)
    description: str

    def tokens(self, model: Model) -> list[int]:
        """The prompt (generate) or the scored text (score), as the model's token ids."""
        knobs = read_synth_info(model.path)
        if knobs is not None:
            return topic_stream(
                knobs, model.decoder.spec.vocab_size, model.eos_token_ids, self.prompt_tokens, self._seed()
            )
        ids = model.encode(TEXT)
        repeats = -(-self.prompt_tokens // len(ids))
        return (ids * repeats)[: self.prompt_tokens]

    def sampler(self, model: Model) -> Sampler:
        """Synthetic checkpoints sample (their topic chain lives in the output distribution); real ones are greedy."""
        if read_synth_info(model.path) is not None:
            return Sampler(temperature=1.0, seed=self._seed())
        return Sampler()

    def identity(self, tokens: list[int]) -> dict:
        digest = hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_sha256": digest,
        }

    def _seed(self) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.name}/{self.version}".encode()).digest()[:4], "little")


WORKLOADS = {
    w.name: w
    for w in (
        Workload("decode-short", 1, "generate", 32, 32, "chat turn: 32-token prompt, 32 tokens decoded"),
        Workload("decode-long", 1, "generate", 512, 128, "long context: 512-token prompt, 128 tokens decoded"),
        Workload(
            "decode-sustained",
            1,
            "generate",
            32,
            512,
            "sustained decode: 32-token prompt, 512 tokens decoded, "
            "long enough for the cache to reach its steady state",
        ),
        Workload("score-512", 1, "score", 512, 0, "teacher-forced scoring of 512 tokens (prefill-shaped)"),
        Workload("score-2048", 1, "score", 2048, 0, "teacher-forced scoring of 2048 tokens (routing statistics)"),
    )
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def topic_stream(knobs: RoutingKnobs, vocab_size: int, exclude: frozenset[int], length: int, seed: int) -> list[int]:
    """``length`` tokens walking the topics: keep the topic with probability ``locality``, else jump uniformly."""
    rng = np.random.default_rng(seed)
    vocab = np.array([v for v in range(vocab_size) if v not in exclude])
    by_topic = [vocab[topic_of(vocab, knobs.topics) == t] for t in range(knobs.topics)]
    topic = int(rng.integers(knobs.topics))
    ids = []
    for _ in range(length):
        ids.append(int(rng.choice(by_topic[topic])))
        if rng.random() >= knobs.locality:
            topic = int(rng.integers(knobs.topics))
    return ids


TEXT = """\
The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a can of oil and a cloth for \
the lens. The island was small, a ridge of granite with a few stunted pines, and the only sounds were the wind \
and the sea. Ships passed far out on the horizon, grey shapes that never came closer than the reef allowed. \
In the winter the storms came from the north-west and the spray reached the gallery, forty metres above the \
rocks. He kept a log of every vessel he saw, the direction of the wind, the height of the waves and the state \
of the light. The supply boat came once a fortnight when the weather allowed, bringing flour, paraffin, \
letters and the newspapers, which he read slowly over the following days, one page each morning with his tea.

Engineers measure what they build. A bridge is loaded with trucks before it opens; an engine runs on a test \
bed for hundreds of hours; a program is timed on the machine it will run on, because the numbers on paper \
rarely survive contact with real hardware. The first measurement is usually wrong, not because the instrument \
is faulty but because something else was also being measured: a warm cache, a background job, a clock that \
changed speed halfway through. Good practice is to repeat, to interleave the things being compared, to report \
the spread as well as the middle, and to write down the conditions so that someone else can check the result.

The market opened early on Saturdays. Farmers from the valley brought apples, pears, cheese and bread; a woman \
sold honey in jars of three sizes; a man with a cart sharpened knives and scissors while people waited. By ten \
the square was full and the cafe on the corner had put out every table it owned. Children ran between the \
stalls, dogs slept in the shade, and the church clock, which had been five minutes slow for as long as anyone \
could remember, struck the hour a little after everyone else had already noticed it.
"""
