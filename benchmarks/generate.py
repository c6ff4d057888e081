"""Generation speed: moonlight.generate (the compiled decode step, and eager) beside transformers'
`generate` on the same weights, greedy, plus prefill MFU; and the decode step's CPU proxies.

    python benchmarks/generate.py [--model moonlight-16b-a3b] [--dtype bf16] [--batches 1,16] [--prompt 16]
        [--new-tokens 128] [--baseline-new-tokens 32] [--prefill 4096] [--json FILE]
    python benchmarks/generate.py --proxies   # host syncs per token, graph breaks, launches per decode step

Random weights (`init_weights`, seed 0). tokens/s = batch * new tokens / wall time of one whole
`generate` (prefill included) after a warm-up run (compiling, recording CUDA graphs). The baselines
(transformers, ours eager) generate --baseline-new-tokens tokens to save time; the ratios compare rates.
Prefill MFU: one forward of a 1 x --prefill prompt into the cache against the device's dense bf16 peak.
Each result is printed (and written to --json) as it comes, so a time limit still leaves numbers.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/kernels.py would shadow `kernels`

import torch  # noqa: E402

from moonlight.config import ModelArgs  # noqa: E402
from moonlight.dtypes import to_dtype  # noqa: E402
from moonlight.generation import Decoder, LatentCache, decode_step, prefill  # noqa: E402
from moonlight.hf import hf_keys, is_expert_stack  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.parallel.compile import apply_compile  # noqa: E402
from benchmarks.gpu_suite import device_peak, random_moonlight  # noqa: E402
from benchmarks.op_counter import OpCounter  # noqa: E402
from tests.helpers import host_syncs  # noqa: E402


def transformers_twin(model: Moonlight):
    """transformers' DeepseekV3ForCausalLM on the same weights, in memory: tensors shared where the
    layouts agree (the experts' gate and up are concatenated into its gate_up_proj)."""
    import transformers  # the [bench] extra

    args = model.args
    cfg = transformers.DeepseekV3Config(**args.to_hf_config())
    p = next(model.parameters())
    with torch.device(p.device):  # its rotary tables are made here; its weights are replaced below
        hf = transformers.DeepseekV3ForCausalLM._from_config(cfg, dtype=p.dtype)
    state = {}
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        if name.endswith("tokens_per_expert"):
            continue
        if is_expert_stack(name):
            layer = name.split(".")[1]
            if name.endswith("gate_proj"):
                up = model.get_parameter(name.replace("gate_proj", "up_proj"))
                state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([t, up], dim=1)
            elif name.endswith("down_proj"):
                state[f"model.layers.{layer}.mlp.experts.down_proj"] = t
            continue
        state[hf_keys(name, args)[0]] = t
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"transformers twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.generation_config.eos_token_id = None
    return hf.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def prefill_flops(args: ModelArgs, seq: int) -> float:
    """Forward FLOPs of one prompt of seq tokens: a third of training's, with the head on the last token only."""
    head = 2 * args.vocab_size * args.hidden_size
    return seq * (args.flops_per_token(seq) - 3 * head) / 3 + head


def run(
    model: Moonlight,
    batches: list[int],
    prompt: int,
    new: int,
    baseline_new: int,
    prefill_len: int,
    backend: str,
    report,
) -> dict:
    """Measure everything, calling report(result) after each number."""
    args, device = model.args, next(model.parameters()).device
    result = {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt": prompt,
        "new_tokens": new,
        "baseline_new_tokens": baseline_new,
        "compile_backend": backend,
        "runs": {},
    }
    runs = result["runs"]

    def record(name, value):
        runs[name] = value
        print(f"generate {name}: {value}", flush=True)
        report(result)

    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, args.vocab_size, (b, prompt), generator=g).to(device) for b in batches}
    outputs = {}
    for b in batches:
        decoder = Decoder(model, b, prompt + new, compile=True, backend=backend)
        start = time.perf_counter()
        outputs[b] = torch.stack(list(decoder.stream(prompts[b], new)), 1).clone()  # warm-up: compiles, records
        warm = time.perf_counter() - start
        seconds = timed(lambda: list(decoder.stream(prompts[b], new)), device)
        record(f"ours compiled batch {b}", {"tokens_per_s": b * new / seconds, "warmup_s": warm})
    peak, source = device_peak(device)
    result.update(peak_flops=peak, peak_source=source)
    prefill_ids = torch.randint(0, args.vocab_size, (1, prefill_len), generator=g).to(device)
    cache = LatentCache(args, 1, prefill_len, next(model.parameters()).dtype, device)

    def prefill_once():
        cache.reset()
        prefill(model, prefill_ids, cache)

    prefill_once()
    seconds = min(timed(prefill_once, device) for _ in range(3))
    flops = prefill_flops(args, prefill_len)
    record(f"prefill {prefill_len} eager", {"seconds": seconds, "mfu_pct": 100 * flops / seconds / peak})
    try:
        hf = transformers_twin(model)
    except Exception as e:  # reported; ours still stands
        record("transformers", {"error": f"{type(e).__name__}: {e}"[:300]})
        hf = None
    for b in batches:
        ids = prompts[b]
        if hf is not None:

            def hf_generate(n):
                return hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

            hf_generate(2)
            seconds = timed(lambda: hf_generate(baseline_new), device)
            n = min(baseline_new, new)
            agree = (hf_generate(n)[:, prompt:] == outputs[b][:, :n]).float().mean().item()
            ours = runs[f"ours compiled batch {b}"]["tokens_per_s"]
            record(
                f"transformers batch {b}",
                {
                    "tokens_per_s": b * baseline_new / seconds,
                    "ours_compiled_over_transformers": ours * seconds / (b * baseline_new),
                    "greedy_tokens_agree": agree,
                },
            )
        decoder = Decoder(model, b, prompt + baseline_new, compile=False)
        seconds = timed(lambda: list(decoder.stream(ids, baseline_new)), device)
        record(f"ours eager batch {b}", {"tokens_per_s": b * baseline_new / seconds})
    hf = None  # freed before what follows
    apply_compile(model, backend)  # the training blocks, compiled per block
    prefill_once()
    seconds = min(timed(prefill_once, device) for _ in range(3))
    record(f"prefill {prefill_len} compiled per block", {"seconds": seconds, "mfu_pct": 100 * flops / seconds / peak})
    return result


# Moonlight's structure (27 layers, the first dense; 64 experts, top-6, 2 shared) at tiny widths
PROXY_ARGS = ModelArgs.preset(
    "moonlight-16b-a3b",
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    vocab_size=512,
    kernels="torch",
)


def proxies(model: Moonlight, batch: int, prompt: int = 16, new: int = 33) -> dict:
    """The decode step on the CPU: host syncs per token (the loop's eos checks included), graph breaks
    under torch.compile, and the eager step's launches (non-view ops, as the training proxies count)."""
    ids = torch.randint(0, model.args.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    decoder = Decoder(model, batch, prompt + new, compile=False)
    loop_syncs = host_syncs(lambda: list(decoder.stream(ids, new, eos_token_id=0)))
    next(decoder.stream(ids, new, eos_token_id=0))  # the prefill
    counter = OpCounter()
    with counter:
        step_syncs = host_syncs(decoder.step)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(decode_step)(decoder)
    return {
        "batch": batch,
        "host_syncs_per_step": len(step_syncs),
        # the prefill's one (is the prompt padded?) left out: per prompt, not per token
        "host_syncs_per_token_with_eos": (len(loop_syncs) - 1) / new,  # one end check per 16 tokens
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "launches_per_eager_step": counter.summary()["launches"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moonlight-16b-a3b", help="a ModelArgs preset")
    ap.add_argument("--layers", type=int, help="keep this many layers (default: all)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--baseline-new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--proxies", action="store_true", help="the CPU proxies of the decode step (PROXY_ARGS)")
    a = ap.parse_args()
    if a.proxies:
        model = random_moonlight(PROXY_ARGS, "cpu", torch.float32).eval()
        for batch in (1, 16):
            print(json.dumps(proxies(model, batch)))
        return
    overrides = {} if a.layers is None else {"num_hidden_layers": a.layers}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_moonlight(ModelArgs.preset(a.model, **overrides), device, to_dtype(a.dtype, "--dtype")).eval()
    report = (lambda r: a.json.write_text(json.dumps(r, indent=1))) if a.json else (lambda r: None)
    run(
        model,
        [int(b) for b in a.batches.split(",")],
        a.prompt,
        a.new_tokens,
        a.baseline_new_tokens,
        a.prefill,
        a.backend,
        report,
    )


if __name__ == "__main__":
    main()
