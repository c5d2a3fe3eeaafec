"""``autoresearch``: the one command-line program. Verbs import what they need lazily, so --help is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoresearch", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    g = verbs.add_parser("generate", help="decode from a checkpoint, streaming its experts from disk")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    prompt.add_argument("--ids", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    g.set_defaults(run=_generate)

    s = verbs.add_parser("synth", help="write a synthetic MoE checkpoint (random weights, real files)")
    s.add_argument("--preset", required=True, choices=["tiny", "quickstart"])
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(run=_synth)

    args = parser.parse_args(argv)
    from engine.errors import EngineError

    try:
        return args.run(args)
    except (EngineError, ValueError) as e:
        print(f"autoresearch {args.verb}: error: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from engine import Sampler, generate, load_model

    model = load_model(args.model)
    try:
        ids = model.encode(args.prompt) if args.prompt is not None else _parse_ids(args.ids)
        sampler = Sampler(args.temperature, args.top_p, args.seed)
        result = generate(model, ids, args.max_new_tokens, sampler, stop_at_eos=not args.ignore_eos)
    finally:
        model.close()
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(result.text if result.text is not None else ",".join(map(str, result.tokens)))
    per_token = result.expert_bytes_read / max(len(result.tokens), 1)
    print(
        f"prefill {len(result.prompt_ids)} tok at {result.prefill_tok_s:.1f} tok/s | "
        f"decode {len(result.tokens)} tok at {result.decode_tok_s:.1f} tok/s | "
        f"expert bytes read {result.expert_bytes_read / 2**20:.1f} MiB ({per_token / 2**20:.2f} MiB/token) | "
        f"experts loaded {result.experts_loaded}",
        file=sys.stderr,
    )
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ids must be comma-separated integers, got {text!r}") from None


def _synth(args: argparse.Namespace) -> int:
    from engine.synth import PRESETS, synthesize

    out = synthesize(args.out, PRESETS[args.preset], args.dtype, args.seed)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
