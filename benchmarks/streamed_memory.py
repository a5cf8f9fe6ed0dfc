"""Peak memory of ``quant-export quantize`` on a 1.26 B-parameter Llama: streamed vs whole model.

Builds random-weight Llamas (hidden 2048, GQA 16/4, MLP 5632, SmolLM2's tokenizer and vocabulary,
bfloat16 safetensors in shards) of 8, 16 and 24 decoder layers (24 layers: 1.26 B parameters,
2.5 GB), then runs, each in a fresh process:

* ``streamed``: ``quant-export quantize --qformat fp8 --eval-windows 0 --calib-size 8`` (the
  checkpoint layouts are written layer by layer);
* ``whole``: what the job did before it streamed: load the whole model in float32, ``mtq.quantize``,
  ``export_compressed_tensors``, ``validate``, same config and batches.

and prints peak RSS of the whole process (``VmHWM``), CPU seconds and wall seconds, with the
peak as a fraction of the bfloat16 checkpoint.

    python benchmarks/streamed_memory.py [--layers 8,16,24] [--modes streamed,whole]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 2048, 5632, 16, 4


def make_llama(folder: Path, layers: int) -> int:
    """Write a random bfloat16 Llama of ``layers`` layers into ``folder``; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from quant_export.quantize_cmd import default_model_dir

    tokenizer_dir = default_model_dir()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    folder.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    gen = torch.Generator().manual_seed(0)
    kv = KV_HEADS * HIDDEN // HEADS

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }  # fmt: skip
    shards = [{"model.embed_tokens.weight": rand(vocab, HIDDEN)}]
    for i in range(layers):
        if i % 4 == 0:
            shards.append({})
        prefix = f"model.layers.{i}."
        for name, shape in shapes.items():
            shards[-1][prefix + name] = rand(*shape)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            shards[-1][prefix + norm] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    shards.append(
        {
            "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            "lm_head.weight": rand(vocab, HIDDEN),
        }
    )
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * 2 for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _child(mode: str, model: str, out: str) -> None:
    import torch

    torch.set_num_threads(2)
    start = time.perf_counter()
    if mode == "streamed":
        from quant_export.cli import main

        argv = ["quantize", "--model", model, "--output", out, "--qformat", "fp8"]
        assert main([*argv, "--eval-windows", "0", "--calib-size", "8", "--device", "cpu"]) == 0
    else:
        import quant_core as mtq
        from quant_export.checkpoint_check import validate
        from quant_export.compressed_tensors_export import export_compressed_tensors
        from quant_export.quantize_cmd import load_model, load_tokenizer, quant_config
        from quant_llm import create_forward_loop
        from quant_llm.calib_data import read_texts, tokenize_windows

        tokenizer = load_tokenizer(Path(model))
        windows = tokenize_windows(tokenizer, read_texts(None), 256, 8)
        batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in windows.split(4)]
        net = load_model(Path(model))
        mtq.quantize(net, quant_config("fp8", "none"), create_forward_loop(net, batches))
        export_compressed_tensors(net, out, dtype=torch.bfloat16)
        validate(out)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child started by a large
    # parent would report the parent's size
    hwm_kib = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
    print(
        "RESULT "
        + json.dumps(
            {
                "peak_gb": hwm_kib * 1024 / 1e9,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "wall_s": time.perf_counter() - start,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="8,16,24")
    parser.add_argument("--modes", default="streamed,whole")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in map(int, args.layers.split(",")):
            folder = Path(tmp) / f"llama-{layers}"
            size = make_llama(folder, layers)
            for mode in args.modes.split(","):
                out = Path(tmp) / f"out-{layers}-{mode}"
                done = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(folder), str(out)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{mode} on {layers} layers failed ({done.returncode})")
                result = json.loads(line[0][7:])
                rows.append((layers, size, mode, result))
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(folder)
    print(
        f"{'layers':>6} {'bf16 ckpt':>10} {'mode':>9} {'peak RSS':>9} {'/ ckpt':>7} {'CPU s':>7} {'wall s':>7}"
    )
    for layers, size, mode, r in rows:
        print(
            f"{layers:>6} {size / 1e9:>8.2f}GB {mode:>9} {r['peak_gb']:>7.2f}GB "
            f"{r['peak_gb'] * 1e9 / size:>7.2f} {r['cpu_s']:>7.0f} {r['wall_s']:>7.0f}"
        )


if __name__ == "__main__":
    main()
