"""Routing traces recorded by Hugging Face transformers (``autoresearch trace --backend transformers``), on CPU or
GPU, for checkpoints of the architectures the engine knows.

transformers runs the pass (the same forward calls as the benchmark: the prompt, then one call per decoded token,
its tokens picked by the workload's own sampler from transformers' logits). A forward hook on every MoE layer's
router (``...layers.<i>.<block>.gate``, which transformers 5 gives each of them) keeps its input and its logits; the
engine's recorder scores them as the engine's router does (``router_scores_of``) and ranks gate_lookahead's
proposals by applying the later routers' weights to that input. The engine's model, loaded without its experts,
gives the prompt, the sampler and the experts' byte ranges; the trace records no compute time (transformers'
is not the engine's).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from engine.analysis.trace import Recorder, Trace, assemble, new_recorder
from engine.bench.workloads import Workload
from engine.config import EngineConfig
from engine.model.decoder import router_scores_of
from engine.model.load import Model, load_model

GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.[A-Za-z_]+\.gate$")  # a MoE layer's router module


def record_trace_transformers(model_dir: str | Path, workload: Workload, device: str = "cpu") -> Trace:
    """One pass of ``workload`` over the checkpoint ``model_dir`` in transformers on ``device``, recorded."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ValueError(f"--backend transformers needs torch and transformers installed: {e}") from None
    model = load_model(model_dir, EngineConfig())
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        gates = _gates(hf, model)
        spec = model.decoder.spec
        weights = {layer: gate.weight.detach().float() for layer, gate in gates.items()}
        biases = {layer: _bias(gate) for layer, gate in gates.items()}

        def router_scores(layer: int, h: np.ndarray) -> np.ndarray:
            logits = torch.nn.functional.linear(torch.from_numpy(h).to(device), weights[layer])
            return router_scores_of(logits.cpu().numpy(), spec.grouped_router, biases[layer])

        recorder = new_recorder(model, router_scores)
        hooks = [gate.register_forward_hook(_observer(recorder, layer, spec, biases[layer]))
                 for layer, gate in gates.items()]  # fmt: skip
        try:
            with torch.no_grad():
                prompt, fed = _run(hf, model, workload, device)
        finally:
            for hook in hooks:
                hook.remove()
        recorded_with = {"backend": "transformers", "transformers": transformers.__version__, "device": device}
        return assemble(model, workload, prompt, fed, recorder, recorded_with, None, None)
    finally:
        model.close()


def _gates(hf: Any, model: Model) -> dict[int, Any]:
    """Each MoE layer's router module in transformers' model, by layer index; the engine's MoE layers exactly."""
    gates = {int(m.group(1)): module for name, module in hf.named_modules() if (m := GATE.search(name))}
    expected = model.decoder.spec.moe_layers
    if sorted(gates) != expected:
        raise ValueError(
            f"{model.path}: transformers' model has routers (modules named layers.<i>.<block>.gate) at layers "
            f"{sorted(gates)}, the engine's MoE layers are {expected}"
        )
    return gates


def _bias(gate: Any) -> np.ndarray | None:
    bias = getattr(gate, "e_score_correction_bias", None)  # the grouped sigmoid router's choice correction
    return None if bias is None else bias.detach().float().cpu().numpy()


def _observer(recorder: Recorder, layer: int, spec: Any, bias: np.ndarray | None) -> Any:
    def observe(_module: Any, inputs: tuple, output: Any) -> None:
        h = inputs[0].detach().float().reshape(-1, spec.hidden_size).cpu().numpy()
        logits = output[0].detach().float().reshape(h.shape[0], -1).cpu().numpy()
        recorder.observe(layer, h, router_scores_of(logits, spec.grouped_router, bias))

    return observe


def _run(hf: Any, model: Model, workload: Workload, device: str) -> tuple[list[int], list[int]]:
    """The prompt and every token id the forward calls took: the prompt in one call (a score workload stops
    there), then each token the workload's sampler picks, one per call."""
    import torch

    prompt = workload.tokens(model)
    out = hf(input_ids=torch.tensor([prompt], device=device), use_cache=workload.kind == "generate")
    if workload.kind == "score":
        return prompt, prompt
    pick = workload.sampler(model).picker()
    fed = list(prompt)
    for step in range(workload.new_tokens):
        token = pick(out.logits[0, -1].float().cpu().numpy())
        if step + 1 == workload.new_tokens:  # the last sampled token is never fed back
            break
        fed.append(token)
        out = hf(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
    return prompt, fed
