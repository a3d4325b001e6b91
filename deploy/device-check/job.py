"""The device check's task: two ranks on the one GPU the portal assigned, started by
``python -m torch.distributed.run --standalone --nproc_per_node=2 job.py``.

Each rank checks a GPU matrix product against the CPU's, multiplies bf16 matrices on the
GPU for a few seconds while holding a buffer (so the agent's NVML readings show memory in
use), then the ranks all-reduce with gloo (NCCL refuses two ranks on one device). Every
rank prints one ``DEVCHECK`` line that check.py reads: rank, world size, device,
CUDA_VISIBLE_DEVICES, uid, throughput, and whether each check passed. ``DEVCHECK_CPU=1``
(the rehearsal without a GPU) runs the same on the CPU. Exit code 0 only if every check
inside the job passed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    want_gpu = os.environ.get("DEVCHECK_CPU") != "1"
    seconds = float(os.environ.get("DEVCHECK_SECONDS", "12"))
    if want_gpu and not torch.cuda.is_available():
        try:  # the reason, where CUDA gives one (no driver library found, no device node...)
            torch.cuda.init()
            why = "torch.cuda.init() raised nothing"
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        print(f"DEVCHECK-ERROR rank={rank} CUDA is not available to this task: {why} "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
              f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH')!r})", flush=True)
        return 3
    if want_gpu:
        # The portal gave the task one GPU: both ranks share cuda:0.
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        name, size, dtype = torch.cuda.get_device_name(device), 8192, torch.bfloat16
        # Held until the end, so the heartbeats while we run show memory in use (4 GiB a rank).
        ballast = torch.empty(4 << 30, dtype=torch.uint8, device=device)
        ballast.fill_(1)
    else:
        device, name, size, dtype, ballast = torch.device("cpu"), "cpu", 256, torch.float32, None

    # The GPU's product against the CPU's (a loose bound: it catches garbage, not rounding).
    gen = torch.Generator(device="cpu").manual_seed(1234)
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    reference = a @ b
    error = float((((a.to(device) @ b.to(device)).cpu() - reference).abs().max()) / reference.abs().max())
    matmul_ok = error < 1e-2

    x = torch.randn(size, size, device=device, dtype=dtype)
    y = torch.randn(size, size, device=device, dtype=dtype)
    products, started = 0, time.perf_counter()
    while True:
        for _ in range(10):
            z = x @ y
        products += 10
        if want_gpu:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    tflops = 2 * size**3 * products / elapsed / 1e12
    finite = bool(torch.isfinite(z).all())

    # Exact in float64: rank r sends (r + 1) x [1..1024]; the sum is world(world+1)/2 x that.
    data = torch.arange(1, 1025, dtype=torch.float64)
    total = data * (rank + 1)
    dist.all_reduce(total)  # gloo, on the CPU
    allreduce_ok = bool(torch.equal(total, data * (world * (world + 1) // 2)))
    ranks = torch.tensor([float(rank)])
    dist.all_reduce(ranks)
    ranks_ok = float(ranks) == world * (world - 1) / 2

    peak_mib = torch.cuda.max_memory_allocated(device) // (1 << 20) if want_gpu else 0
    ok = matmul_ok and allreduce_ok and ranks_ok and finite and (ballast is None or int(ballast[-1]) == 1)
    report = {"rank": rank, "world": world, "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
              "device": name, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "uid": os.getuid(), "user": os.environ.get("USER"), "host": socket.gethostname(),
              "torch": torch.__version__, "backend": dist.get_backend(), "matmul_size": size,
              "products": products, "seconds": round(elapsed, 2), "tflops": round(tflops, 1),
              "peak_allocated_mib": peak_mib, "matmul_rel_error": error, "allreduce_ok": allreduce_ok,
              "ranks_ok": ranks_ok, "ok": ok}
    # One write(2) of the whole line: both ranks append to the same log, and a print() may
    # reach it in two pieces that the other rank's line lands between.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"DEVCHECK {json.dumps(report, sort_keys=True)}\n".encode())
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 4


if __name__ == "__main__":
    sys.exit(main())
