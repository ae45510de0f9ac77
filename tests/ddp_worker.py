"""One rank of a distributed training run, for tests/test_distributed.py (started by torchrun, or alone).

Trains with ponder's Trainer, then writes this rank's whole state to ``<out>/rank<R>.safetensors`` (the model's
tensors and the optimizer's, by name) and ``<out>/rank<R>.json`` (the dials, the controllers' and the optimizer's
other state), so that the test can compare the ranks with each other and with a run in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ponder import distributed
from ponder.config import load_config
from ponder.train import Trainer


def main(config: str, out: str, spread: str = "0") -> None:
    trainer = Trainer(load_config(config), out, progress=False)
    if float(spread):  # spread the halting units (zero at init) so tokens, and so ranks, halt at different depths
        with torch.no_grad():
            trainer.model.halting.weight.copy_(
                torch.randn(trainer.model.halting.weight.shape, generator=torch.Generator().manual_seed(1))
                * float(spread))
    halt_calls: list[list[bool]] = []  # [this rank's batch halted, the global batch halted] per check
    sync = trainer.model.sync_halting
    if sync is not None:
        def recorded(flag):
            everywhere = sync(flag)
            halt_calls.append([bool(flag), everywhere])
            return everywhere

        trainer.model.sync_halting = recorded
    trainer.train()
    rank = trainer.dist.rank
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    other: dict = {"world_size": trainer.dist.world_size, "step": trainer.step}
    opt = trainer.optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous().reshape(-1)
            else:
                other[f"optimizer.{pid}.{key}"] = value
    other["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    other["dials"] = trainer.model.dials.snapshot()
    other["controllers"] = [c.state_dict() for c in trainer.controllers]
    other["halt_calls"] = halt_calls
    other["metrics"] = getattr(trainer.optimizer, "metrics", dict)()
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(other, default=float))
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
