"""The ``autoresearch`` program's engine verbs, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from engine import load_model, score
from engine.config import EngineConfig
from search.cli import main


def test_synth_then_generate_text(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["synth", "--preset", "tiny", "--out", str(out)]) == 0
    assert (
        main(["generate", "--model", str(out), "--prompt", "The expert", "--max-new-tokens", "6", "--ignore-eos"]) == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "decode 6 tok" in captured.err and "expert bytes read" in captured.err and "experts loaded" in captured.err


def test_generate_json_with_ids(tmp_path, capsys):
    out = tmp_path / "model"
    main(["synth", "--preset", "tiny", "--out", str(out)])
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--ids",
                "1,2,3",
                "--max-new-tokens",
                "4",
                "--ignore-eos",
                "--json",
                "--temperature",
                "0.8",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert len(record["tokens"]) == 4 and record["prompt_ids"] == [1, 2, 3]
    # 3 decode steps x 2 layers x top-2, plus the prefill's distinct experts per layer (2 to 6 of 8 each)
    assert 3 * 2 * 2 + 2 * 2 <= record["experts_loaded"] <= 3 * 2 * 2 + 2 * 6
    assert record["expert_bytes_read"] > 0


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--ids", "1"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    main(["synth", "--preset", "tiny", "--out", str(tmp_path / "m")])
    assert main(["generate", "--model", str(tmp_path / "m"), "--ids", "1,x"]) == 2
    assert "--ids must be comma-separated integers" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "synth", "--preset", "tiny", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote qwen3_moe checkpoint" in done.stdout


def test_synthetic_checkpoint_loads_identically_in_transformers(tmp_path):
    main(["synth", "--preset", "tiny", "--dtype", "bf16", "--out", str(tmp_path / "m")])
    ids = list(range(3, 40))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(score(load_model(tmp_path / "m"), ids), expected, atol=1e-4, rtol=0)


def test_synth_by_size_with_knobs(tmp_path, capsys):
    out = tmp_path / "sized"
    args = ["synth", "--arch", "mixtral", "--size", "40MiB", "--hidden-size", "128", "--locality", "0.9"]
    assert main([*args, "--out", str(out)]) == 0
    assert "mixtral checkpoint" in capsys.readouterr().out
    assert json.loads((out / "synth.json").read_text())["knobs"]["locality"] == 0.9
    assert main(["synth", "--arch", "mixtral", "--out", str(tmp_path / "x")]) == 2
    assert "--size" in capsys.readouterr().err
    assert main(["synth", "--arch", "mixtral", "--size", "lots", "--out", str(tmp_path / "x")]) == 2
    assert "--size must be a byte size" in capsys.readouterr().err


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    main(["synth", "--preset", "tiny", "--out", str(tmp_path / "m")])
    config = tmp_path / "engine.toml"
    config.write_text("[engine]\ntop_k = 1\n")
    out = tmp_path / "result.json"
    args = ["bench", "--model", str(tmp_path / "m"), "--config", str(config), "--repeats", "1", "--warm"]
    assert main([*args, "--no-probe", "--no-quality", "--out", str(out)]) == 0
    assert "decode tok/s" in capsys.readouterr().out
    assert json.loads(out.read_text())["config"] == EngineConfig(top_k=1).to_dict()


def test_bench_errors_are_one_clear_line(tmp_path, capsys):
    model = tmp_path / "m"
    main(["synth", "--preset", "tiny", "--out", str(model)])
    capsys.readouterr()
    base = ["bench", "--no-probe", "--no-quality", "--repeats", "1"]
    assert main([*base, "--model", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main([*base, "--model", str(model), "--workload", "nope"]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err
    assert main([*base, "--model", str(model), "--memory-limit", "1KiB"]) == 2
    assert "does not exceed the weights the engine keeps resident" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\ncache_size = 3\n")
    assert main([*base, "--model", str(model), "--config", str(bad)]) == 2
    assert f"{bad}: field 'cache_size': unknown engine setting" in capsys.readouterr().err


def test_repack_then_generate(tmp_path, capsys):
    assert main(["synth", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["repack", str(tmp_path / "m"), "--format", "int8", "--out", str(tmp_path / "r")]) == 0
    assert "int8" in capsys.readouterr().out
    args = ["generate", "--model", str(tmp_path / "r"), "--ids", "1,2,3", "--max-new-tokens", "2"]
    assert main(args) == 0
    assert (
        main(["repack", str(tmp_path / "m"), "--format", "int4", "--group-size", "32", "--out", str(tmp_path / "r")])
        == 2
    )
    assert "not empty" in capsys.readouterr().err


def test_probe_measures_as_the_engine_reads_unless_fio_like(tmp_path, monkeypatch, capsys):
    from engine.bench import probe

    asked = []

    def fake(directory, cache_dir, refresh=False, **grid):
        asked.append(grid)
        raise ValueError("stop here")

    monkeypatch.setattr(probe, "load_or_probe", fake)
    assert main(["probe", "--dir", str(tmp_path)]) == 2
    assert main(["probe", "--dir", str(tmp_path), "--fio-like"]) == 2
    assert asked == [probe.ENGINE_GRID, {}]


def test_help_imports_nothing_of_the_engine_but_its_verbs():
    listing = "from search.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    listing += "import sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('engine', 'numpy', 'numba')))"
    done = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True)
    assert "synth" in done.stdout and "tune" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "['engine', 'engine.cli']"


def test_a_verbs_choices_come_from_the_engine(capsys):
    from engine.formats.quant import FORMATS
    from engine.synth.shapes import ARCHS, PRESETS

    for verb in ("synth", "repack"):
        try:
            main([verb, "--help"])
        except SystemExit as e:
            assert e.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in (*ARCHS, *PRESETS, *FORMATS))
