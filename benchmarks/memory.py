"""Peak memory of calibrating the real SmolLM2-135M: whole model vs layer by layer vs accelerate offload.

Each configuration runs in a fresh child process (``--child NAME``), which loads the model,
calibrates it on a few windows of *Emma* and reports its peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``), the resident size after loading and the peak during
calibration alone (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``). The
table compares each configuration's quantizer state (every amax) and weights with the
whole-model in-memory run.

    python benchmarks/memory.py [--algorithms max,gptq] [--samples 4] [--seq-len 128]
                                [--configs "in memory,layerwise + disk offload"]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

CONFIGS = {
    "in memory": {"layerwise": False, "offload": False},
    "layerwise": {"layerwise": True, "offload": False},
    "disk offload": {"layerwise": False, "offload": True},
    "layerwise + disk offload": {"layerwise": True, "offload": True},
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(name: str, algorithm: str, samples: int, seq_len: int, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import quant_core as mtq
    from quant_core.offload import weights_materialized
    from quant_llm import create_forward_loop, get_calib_dataloader
    from quant_llm.testing.real_models import SMOLLM2_CACHE_NAME, cache_root, load_smollm2

    torch.set_num_threads(2)
    folder = cache_root() / SMOLLM2_CACHE_NAME
    if not (folder / "config.json").is_file():
        load_smollm2()  # writes the fp32 cache once
    setting = CONFIGS[name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    loader = get_calib_dataloader(
        tokenizer, DATA / "austen_emma.txt", num_samples=samples, seq_len=seq_len, batch_size=1
    )
    forward_loop = create_forward_loop(dataloader=loader)
    before_load = _status_kib("VmRSS")
    with tempfile.TemporaryDirectory() as offload_dir:
        kwargs = {"dtype": torch.float32}
        if setting["offload"]:
            layers = AutoConfig.from_pretrained(folder).num_hidden_layers
            device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu"}
            device_map |= {f"model.layers.{i}": "disk" for i in range(layers)}
            device_map |= {"model.norm": "cpu", "lm_head": "cpu"}
            kwargs |= {"device_map": device_map, "offload_folder": offload_dir}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        after_load = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        cfg = mtq.INT8_DEFAULT_CFG if algorithm == "max" else mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG
        spec = {"method": algorithm, "layerwise": setting["layerwise"]}
        start = time.perf_counter()
        mtq.quantize(model, {**cfg.copy(), "algorithm": spec}, forward_loop)
        seconds = time.perf_counter() - start
        calib_peak = _status_kib("VmHWM")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with weights_materialized(model):
            state = {
                k: v.detach().clone()
                for k, v in model.state_dict().items()
                if k.endswith("_amax") or (algorithm != "max" and k.endswith(".weight"))
            }
    torch.save(state, out)
    params = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "peak_kib": peak,
                "calib_peak_kib": calib_peak,
                "before_load_kib": before_load,
                "after_load_kib": after_load,
                "model_bytes": params * 4,
                "seconds": seconds,
            }
        )
    )


def _run(name: str, algorithm: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--algorithms", algorithm]
    cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> str:
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if x.keys() != y.keys():
        return "different keys"
    differ = sum(not torch.equal(x[k], y[k]) for k in x)
    return "identical" if differ == 0 else f"{differ}/{len(x)} tensors differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="max")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--child", choices=list(CONFIGS))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.algorithms, args.samples, args.seq_len, args.out)
        return
    mib = 1 / 1024
    print(
        f"SmolLM2-135M fp32, {args.samples} x {args.seq_len} tokens; RSS in MiB "
        "(peak: whole child process; calibration: peak during quantize minus RSS before it)\n"
    )
    print(
        "| algorithm | configuration | model weights | RSS before load (imports) | "
        "RSS after load | peak RSS | calibration peak (above load) | peak / first peak | "
        "peak above imports / first's | time (s) | vs first |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms.split(","):
            first = None
            for name in args.configs.split(","):
                out = Path(tmp) / f"{algorithm}-{name.replace(' ', '_')}.pt"
                r = _run(name, algorithm, args, out)
                first = first or (r, out)
                ratio = r["peak_kib"] / first[0]["peak_kib"]
                own = (r["peak_kib"] - r["before_load_kib"]) / (
                    first[0]["peak_kib"] - first[0]["before_load_kib"]
                )
                print(
                    f"| {algorithm} | {name} | {r['model_bytes'] / 2**20:.0f} | "
                    f"{r['before_load_kib'] * mib:.0f} | "
                    f"{r['after_load_kib'] * mib:.0f} | {r['peak_kib'] * mib:.0f} | "
                    f"{(r['calib_peak_kib'] - r['after_load_kib']) * mib:.0f} | "
                    f"{ratio:.0%} | {own:.0%} | {r['seconds']:.1f} | {_same(out, first[1])} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
