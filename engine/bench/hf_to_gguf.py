"""llama.cpp's ``convert_hf_to_gguf.py`` for a synthetic checkpoint, run in the converter's venv (not the engine's).

    python hf_to_gguf.py LLAMA_CPP_TREE CHECKPOINT OUT.gguf    (PYTHONPATH: the tree and its gguf-py)

The converter names a BPE tokenizer's pre-tokenizer by hashing the tokens it gives for a fixed text, and refuses
hashes it does not know. The synthetic checkpoints' tokenizer (``engine/synth/tokenizer.py``) is trained here,
so no table has its hash; its pre-tokenizer is ``tokenizers``' ByteLevel with the GPT-2 regex, which llama.cpp
implements as ``gpt-2``. This script answers that name in place of the hash lookup, after checking
``tokenizer.json`` really is that, and runs the converter unchanged otherwise (the llama.cpp tree is not edited).
Outputs bf16, as the checkpoint stores its weights.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

PRE_TOKENIZER = "gpt-2"


def byte_level_gpt2(model, tokenizer) -> str:
    """The pre-tokenizer's llama.cpp name, read from ``tokenizer.json`` instead of a table of token hashes."""
    pre = json.loads((Path(model.dir_model) / "tokenizer.json").read_text())["pre_tokenizer"]
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise NotImplementedError(f"not a GPT-2 byte-level pre-tokenizer: {pre}")
    return PRE_TOKENIZER


def main(argv: list[str]) -> int:
    tree, model, out = argv
    from conversion.base import TextModel  # the tree's own package, on PYTHONPATH

    TextModel.get_vocab_base_pre = byte_level_gpt2
    sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "bf16", "--outfile", out]
    runpy.run_path(str(Path(tree) / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
