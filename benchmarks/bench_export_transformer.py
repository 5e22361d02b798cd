"""A transformer encoder exported post-training with its attention projections packed (hwaware
routes ``nn.MultiheadAttention`` into ``in_proj`` / ``out_proj`` layers) against the same export
with attention left FP32 (what hwaware did before), FP32 eager and ``quantize_dynamic``; one run, JSON.

    python benchmarks/bench_export_transformer.py            # ~2 min on 2 cores
    python benchmarks/bench_export_transformer.py --fast     # smoke run

The model (a token classifier: embedding, a 4-layer pre-norm ``nn.TransformerEncoder`` of width 256, mean
pooling, a linear head) is first trained in FP32 on a generated task (the class is which quarter of
the vocabulary most of a sequence's tokens fall in), so that accuracy means something. Each export
goes through hwaware's regression gate on a held-out split (accuracy, ``max_drop`` 1.0 so it
reports rather than refuses). Throughput: ``inference_mode``, batches of 32 sequences of 128
tokens, all models interleaved in rounds; FP32 runs torch's fused encoder fast path there, and
``quantize_dynamic`` (which leaves ``out_proj`` and ``in_proj_weight`` FP32: torch marks the former
not dynamically quantizable) runs the unfused layers, its quantized Linear breaking the fused path.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import cpu_device, write_json  # noqa: E402

import hwaware  # noqa: E402
from hwaware.export.bench import compare_throughput  # noqa: E402

VOCAB, DIM, HEADS, FF, LAYERS, CLASSES = 4096, 256, 4, 1024, 4, 4


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True),
                                         LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


def _data(n: int, seq: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    quarter = VOCAB // CLASSES
    # 60% of the tokens from the class's quarter, the rest anywhere: the majority must be counted
    own = torch.randint(0, quarter, (n, seq), generator=g) + (y * quarter)[:, None]
    anywhere = torch.randint(0, VOCAB, (n, seq), generator=g)
    x = torch.where(torch.rand(n, seq, generator=g) < 0.6, own, anywhere)
    return TensorDataset(x, y)


def _train(model: nn.Module, steps: int, seq: int) -> float:
    train = DataLoader(_data(32 * steps, seq, 0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for x, y in train:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in ("weights.safetensors",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="few training steps and timing rounds (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/export_transformer_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    seq, steps, rounds = (32, 20, 2) if args.fast else (128, 150, 5)
    model = TextClassifier()
    train_s = _train(model, steps, seq)
    val = DataLoader(_data(512, seq, 1), batch_size=64)
    work = tempfile.mkdtemp(prefix="hwaware_bench_tf_")
    try:
        exports = {}
        for label, skip in (("attention_fp32", ["*.self_attn"]), ("attention_int8", [])):
            art = hwaware.export(model, os.path.join(work, label), val_dataloader=val, metric="accuracy", max_drop=1.0,
                                 skip=skip)
            reg = art.manifest["regression"]
            exports[label] = {
                "artifact": art, "packed_bytes": art.manifest["packed_bytes"], "fp32_bytes": art.manifest["fp32_bytes"],
                "weights_file_bytes": _bytes(art.path),
                "accuracy": reg["exported"], "accuracy_fp32": reg["reference"], "drop": reg["drop"],
                "packed_layers": len(art.manifest["layers"]), "dense_layers": sorted(art.manifest.get("dense_layers", {})),
            }
        qd = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        for layer in qd.enc.layers:
            # its Linear's .weight is a method, which torch's fused encoder path reads as a tensor
            # (AttributeError under no_grad): run its layers unfused, as training does
            layer.activation_relu_or_gelu = 0
        with torch.inference_mode():
            x_val, y_val = next(iter(DataLoader(_data(512, seq, 1), batch_size=512)))
            qd_acc = float((qd(x_val).argmax(1) == y_val).float().mean())
        inputs = [(x,) for x, _ in DataLoader(_data(32 * 4, seq, 2), batch_size=32)]
        models = {"fp32": model, "export_attention_fp32": exports["attention_fp32"]["artifact"].model,
                  "export_attention_int8": exports["attention_int8"]["artifact"].model, "quantize_dynamic": qd}
        throughput = compare_throughput(models, inputs, batch_size=32, rounds=rounds)
        result = {
            "benchmark": "export_transformer", "device": cpu_device(), "torch": torch.__version__,
            "model": {"vocab": VOCAB, "dim": DIM, "heads": HEADS, "ff": FF, "layers": LAYERS, "classes": CLASSES,
                      "seq": seq, "train_steps": steps, "train_s": train_s},
            "exports": {label: {k: v for k, v in e.items() if k != "artifact"} | {"size_fraction": e["packed_bytes"] / e["fp32_bytes"]}
                        for label, e in exports.items()},
            "quantize_dynamic_accuracy": qd_acc,
            "throughput": throughput,
        }
        for label, e in result["exports"].items():
            print(f"{label}: {e['packed_layers']} packed layers, weights {e['packed_bytes'] / 2**20:.2f} MiB "
                  f"({e['size_fraction']:.3f} of FP32), accuracy {e['accuracy']:.4f} (FP32 {e['accuracy_fp32']:.4f}, "
                  f"drop {e['drop']:+.4f}), {throughput['models']['export_' + label]['ratio']:.2f}x FP32 throughput")
        print(f"quantize_dynamic: accuracy {qd_acc:.4f}, {throughput['models']['quantize_dynamic']['ratio']:.2f}x FP32 throughput")
        if not args.fast:
            write_json(result, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
