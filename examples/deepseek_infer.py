#!/usr/bin/env python3
"""deepseek-7b inference as a portal task (seed 003's example application).

Submit it with, e.g.::

    gpuctl submit --gpus 1 --mem 16G --class online --name deepseek -- \\
        python3 "$PWD/examples/deepseek_infer.py" --model-path /models/deepseek-llm-7b-chat --prompt "Hello"

The agent starts the task with ``CUDA_VISIBLE_DEVICES`` set to its GPUs; the script
loads the model there (transformers + torch, fp16: about 14 GB of weights plus the
KV cache, so ask for ~16 GB per GPU) and prints the completion. A CUDA
out-of-memory error exits with status 3 after printing "CUDA out of memory", which the
agent reports as an OOM (the portal then raises the model's memory estimate and retries).

``--dry-run`` does everything except loading weights: it checks the GPUs the task was
given, the model directory if one is named, and prints the plan and the memory
estimate, then exits 0. Use it to test submission end to end where the weights (or
torch) are not available, as in this repository's demo cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODEL_ID = "deepseek-ai/deepseek-llm-7b-chat"
PARAMS = 6.9e9
EXIT_OOM = 3


def memory_estimate_mb(dtype_bytes: int = 2, context_tokens: int = 4096) -> int:
    weights = PARAMS * dtype_bytes
    # KV cache: 30 layers x 2 (K, V) x 4096 hidden x context x dtype, plus ~10% runtime overhead.
    kv = 30 * 2 * 4096 * context_tokens * dtype_bytes
    return int((weights + kv) * 1.1 / 2**20)


def visible_gpus() -> list[str]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g for g in value.split(",") if g.strip()]


def dry_run(args: argparse.Namespace) -> int:
    plan = {
        "mode": "dry-run (no weights loaded, nothing generated)",
        "model": args.model_path or MODEL_ID,
        "gpus": visible_gpus(),
        "estimated_gpu_memory_mb": memory_estimate_mb(context_tokens=args.max_new_tokens + 1024),
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.model_path and not (Path(args.model_path) / "config.json").is_file():
        print(f"deepseek: error: {args.model_path} has no config.json (not a model directory)", file=sys.stderr)
        return 2
    if not plan["gpus"]:
        print("deepseek: warning: CUDA_VISIBLE_DEVICES is empty: outside the portal, or no GPU was assigned",
              file=sys.stderr)
    print(json.dumps(plan, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        print("deepseek: error: torch and transformers are needed (pip install torch transformers), "
              "or use --dry-run", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("deepseek: error: no CUDA device visible (CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})", file=sys.stderr)
        return 2
    source = args.model_path or MODEL_ID
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=args.model_path is not None)
        model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float16, device_map="auto",
                                                     local_files_only=args.model_path is not None)
        print(f"loaded {source} in {time.perf_counter() - started:.1f} s", flush=True)
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        outputs = model.generate(inputs.to(model.device), max_new_tokens=args.max_new_tokens)
    except torch.cuda.OutOfMemoryError:
        print("CUDA out of memory", file=sys.stderr, flush=True)
        return EXIT_OOM
    print(tokenizer.decode(outputs[0][inputs.shape[1]:], skip_special_tokens=True))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help=f"local model directory (default: {MODEL_ID} from the HF cache)")
    parser.add_argument("--prompt", default="Explain GPU scheduling in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dry-run", action="store_true", help="check and plan only; load no weights")
    args = parser.parse_args()
    return dry_run(args) if args.dry_run else run(args)


if __name__ == "__main__":
    sys.exit(main())
