"""Dead ReLU units of a grid's final models: why a run predicts one class.

    python -m experiments.dead_units fedlora-fmnist

For every run of the grid whose ``final_model.npz`` is on disk (the weights are not
committed: a run's own checkout has them), the final model is evaluated on the server's
test set and, per ReLU, the share of its units (channels for a convolution) that are
positive for no test image at all. A model whose every unit after one layer is dead
outputs the same logits for every input: one class, chance accuracy, and no gradient
through that layer to recover. Writes ``docs/results/<grid>/dead-units.json`` (merged
with runs recorded before whose weights are gone here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.grids import GRIDS
from fl_app.model import build_model
from fl_app.results import load_model
from partitions import dataset_info, load_test_data

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


@torch.no_grad()
def dead_units(model: nn.Module, x: torch.Tensor, y: np.ndarray | None = None) -> dict:
    """Per ReLU module: its units (dim 1 of its output), how many are positive for no
    input of ``x``, and the share of (input, unit) activations that are positive; with
    the number of classes the model predicts and, given labels ``y``, its accuracy."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    model.eval()
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, out in outputs.items():
        alive = (out > 0).transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)
        result[name] = {"units": int(out.shape[1]), "dead": int((~alive).sum()),
                        "active_share": float((out > 0).float().mean())}
    predicted = logits.argmax(1)
    result["predicted_classes"] = int(torch.unique(predicted).numel())
    if y is not None:
        result["test_accuracy"] = float((predicted.numpy() == y).mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", choices=sorted(GRIDS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out_dir = RESULTS / args.grid
    record_path = out_dir / "dead-units.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    tests: dict[str, tuple] = {}
    for run_dir in sorted((out_dir / "runs").iterdir()):
        weights = run_dir / "final_model.npz"
        if not weights.exists():
            continue
        config = json.loads((run_dir / "config.json").read_text())
        dataset, kind = config["dataset"], config.get("model", "cnn")
        if dataset not in tests:
            test = load_test_data(dataset)
            tests[dataset] = (torch.from_numpy(test.x), test.y)
        x, y = tests[dataset]
        model = build_model(dataset_info(dataset), 0, kind=kind)
        arrays = load_model(weights)
        model.load_state_dict({k: torch.from_numpy(np.asarray(arrays[k])) for k in model.state_dict()})
        units = dead_units(model, x, y)
        accuracy = units["test_accuracy"]
        record[run_dir.name] = {**units,
                                "weight_norms": {k: float(np.linalg.norm(np.asarray(v)))
                                                 for k, v in arrays.items()}}
        dead = {k: f"{v['dead']}/{v['units']}" for k, v in units.items() if isinstance(v, dict)}
        print(f"{run_dir.name}: accuracy {accuracy:.4f}, {units['predicted_classes']} classes "
              f"predicted, dead units {dead}")
    record_path.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
    print(f"wrote {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
