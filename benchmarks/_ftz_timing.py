"""Child process of bench_export_recsys.py: FP32 eager, quantize_dynamic and the artifact timed with
flush-to-zero / denormals-are-zero on in every thread.

``torch.set_flush_denormal(True)`` sets the calling thread's MXCSR, and threads inherit it when they
are created, so it must run before torch starts its intra-op thread pool: hence a fresh process,
where it is the first thing done. Prints one JSON line (``compare_throughput``'s result).

    python benchmarks/_ftz_timing.py ARTIFACT FP32.safetensors NUM_SAMPLES SEED BATCHES ROUNDS
"""
import json
import sys

import torch

if not torch.set_flush_denormal(True):
    raise SystemExit("this CPU cannot flush denormals")

import copy  # noqa: E402

from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import hwaware  # noqa: E402
from hwaware.export.bench import compare_throughput  # noqa: E402
from hwaware.recsys import DLRM, CriteoDataModule  # noqa: E402


def main() -> None:
    path, weights, num_samples, seed, batches, rounds = sys.argv[1:7]
    manifest = hwaware.export.read_manifest(path)
    fp32 = DLRM(**manifest["model"]["hparams"]).eval()
    fp32.load_state_dict(load_file(weights))
    qdyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    served = hwaware.load(path)
    infer = CriteoDataModule(num_samples=int(num_samples), batch_size=2048, seed=int(seed))
    infer.setup("fit")
    data = [(b["dense"], b["sparse"]) for _, b in zip(range(int(batches)), infer.val_dataloader())]
    result = compare_throughput({"fp32": fp32, "quantize_dynamic": qdyn, "exported": served}, data, batch_size=2048,
                                rounds=int(rounds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
