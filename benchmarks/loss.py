"""The chunked cross-entropy from hidden states against the plain loss on materialized logits.

    python benchmarks/loss.py

On CUDA: Moonlight's head (H=2048, V=163840), one 4096-token sequence in bf16; prints the time of
forward + backward and the peak memory above the inputs for both, and the ratios. On CPU a smaller
head in fp32 (times only: the CPU allocator keeps no peak).
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])
from moonlight.model.loss import linear_cross_entropy  # noqa: E402


def plain(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="sum")


def measure(fn, hidden, weight, labels, repeats):
    cuda = hidden.is_cuda
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn(hidden, weight, labels).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
    return min(times[1:]), peak


def main():
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokens, hidden_size, vocab = (4096, 2048, 163840) if cuda else (1024, 256, 32768)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, hidden_size, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    print(f"{device} {dtype} tokens={tokens} hidden={hidden_size} vocab={vocab}")
    results = {}
    for name, fn in (("plain", plain), ("chunked", linear_cross_entropy)):
        results[name] = measure(fn, hidden, weight, labels, repeats=3)
        t, peak = results[name]
        print(f"  {name:<8} {t * 1e3:8.1f} ms" + (f"   peak {peak / 2**30:6.2f} GiB" if cuda else ""))
    (tp, mp), (tc, mc) = results["plain"], results["chunked"]
    print(f"  chunked/plain: time {tc / tp:.2f}x" + (f", peak memory {mc / mp:.2f}x" if cuda else ""))


if __name__ == "__main__":
    main()
