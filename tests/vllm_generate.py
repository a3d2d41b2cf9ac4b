"""Greedy generation with vLLM's offline engine and several LoRA adapters in ONE batch (tests/test_vllm.py).

Runs in the separate vLLM virtual environment (scripts/setup_vllm.sh), not in asymlora's:

    .venv-vllm/bin/python tests/vllm_generate.py SPEC.json OUT.json

SPEC.json: {"model": HF directory, "adapters": {name: adapter directory}, "max_lora_rank": int,
"max_tokens": int, "requests": [{"adapter": name, "prompt_token_ids": [...]}, ...]}.
OUT.json: {"token_ids": [[...] per request], "load_s": float, "generate_s": float, "vllm": version}.
vLLM's CPU backend starts its engine in a spawned process, so everything runs under ``__main__``.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(spec_path) as fh:
        spec = json.load(fh)
    names = list(spec["adapters"])
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype="float32",  # bf16 departs from the float32 reference at near-tie logits
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=spec["max_lora_rank"],
        max_loras=len(names),
        max_model_len=spec.get("max_model_len", 512),
        seed=0,
    )
    load_s = time.perf_counter() - t0
    loras = {name: LoRARequest(name, i + 1, spec["adapters"][name]) for i, name in enumerate(names)}
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in spec["requests"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=[loras[r["adapter"]] for r in spec["requests"]])
    generate_s = time.perf_counter() - t0
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "load_s": load_s,
        "generate_s": generate_s,
        "vllm": vllm.__version__,
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
