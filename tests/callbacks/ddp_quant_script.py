"""Run by test_ddp.py: 2-process gloo DDP fit with ProgressiveQuantization and SemiStructuredSparsity (SR-STE,
masks recomputed every step) in one run; each rank dumps its state."""
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from hwaware import ProgressiveQuantization, QuantSpec, SemiStructuredSparsity  # noqa: E402
from tests.helpers import TinyCTR, loaders  # noqa: E402


class Branchy(TinyCTR):
    """A layer only rank 0's training batches reach (a data-dependent branch, an MoE expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.nn.Linear(12, 12)

    def forward(self, dense, ids):
        x = torch.cat([dense, self.emb(ids, torch.arange(ids.shape[0], device=ids.device))], dim=1)
        if self.training and self.global_rank == 0:
            x = x + 0.1 * self.aux(x)
        return self.mlp(x).squeeze(-1)


def branch(out_dir: str) -> None:
    """Calibration with static observers where one rank never calls ``aux``: its observer saw nothing
    and skipped the all_reduce the other rank waited in (a hang)."""
    pl.seed_everything(0, verbose=False)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, freeze_observers_after=2,
                                 activation_spec=QuantSpec(granularity="per_tensor", observer="minmax"))
    trainer = pl.Trainer(
        strategy="ddp_find_unused_parameters_true", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=4,
        limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb],
    )
    train, val = loaders()
    trainer.fit(Branchy(), train, val)
    state = {"act_scales": {n: st.activation.scale.tolist() for n, st in cb.quant_states.items() if st.activation is not None}}
    with open(os.path.join(out_dir, f"branch{trainer.global_rank}.json"), "w") as f:
        json.dump(state, f)


def main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    cb = ProgressiveQuantization(
        start_epoch=1, calibration_batches=2, freeze_observers_after=3,
        activation_spec=QuantSpec(granularity="per_tensor", observer="moving_average", averaging_constant=0.2),
    )
    sp = SemiStructuredSparsity(method="sr_ste", start_epoch=1)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, limit_train_batches=6, limit_val_batches=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[cb, sp],
    )
    train, val = loaders()
    trainer.fit(TinyCTR(), train, val)
    state = {
        "rank": trainer.global_rank,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "phase": cb.phase,
        "report_phases": cb.report["phases"],
        "kl": cb.report["kl"],
        "sqnr_db": cb.report["sqnr_db"],
        "output_kl": cb.report["output_kl"],
        "kl_history": cb.report["kl_history"],
        "fallbacks": cb.report["fallbacks"],
        "act_scales": {n: st.activation.scale.tolist() for n, st in cb.quant_states.items() if st.activation is not None},
        "weight_scales": {n: st.weight.scale.tolist() for n, st in cb.quant_states.items() if st.weight.has_qparams},
        "sparse_phase": sp.phase,
        "masks": {n: m.int().tolist() for n, m in sp.masks.items()},
        "dense": {n: d.tolist() for n, d in sp._dense.items()},
        "mask_changes": [h["mask_changes"] for h in sp.report["history"] if h.get("event") == "validation"],
        "weights": {k: v.tolist() for k, v in trainer.lightning_module.state_dict().items() if k.endswith("weight") and v.dim() == 2 and v.shape[0] < 64},
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(state, f)


def resume(out_dir: str, which: str) -> None:
    """QAT with static observers that never freeze, epoch checkpoints: ``full`` runs 4 epochs,
    ``resume`` resumes the checkpoint written at the end of epoch 1 (mid-QAT). Each dumps rank 0's
    final weights and activation scales."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    cb = ProgressiveQuantization(start_epoch=1, calibration_batches=2, freeze_observers_after=None,
                                 activation_spec=QuantSpec(granularity="per_tensor", symmetric=False,
                                                           observer="moving_average", averaging_constant=0.2))
    ckpt = ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=4, limit_train_batches=4, limit_val_batches=2,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[cb, ckpt], deterministic=True,
    )
    train, val = loaders()
    path = os.path.join(out_dir, "ckpt", "epoch=1.ckpt") if which == "resume" else None
    trainer.fit(TinyCTR(), train, val, ckpt_path=path)
    state = {"act_scales": {n: st.activation.scale.tolist() for n, st in cb.quant_states.items() if st.activation is not None},
             "weights": {k: v.tolist() for k, v in trainer.lightning_module.state_dict().items()}}
    with open(os.path.join(out_dir, f"{which}{trainer.global_rank}.json"), "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    if sys.argv[2:3] == ["resume"]:
        resume(sys.argv[1], sys.argv[3])
    else:
        (branch if sys.argv[2:] == ["branch"] else main)(sys.argv[1])
    # Lightning leaves the process group up; torn down at interpreter exit instead, gloo's threads
    # could abort the process ("terminate called without an active exception", exit -6) under load
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
