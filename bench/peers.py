"""sui and the peer data-attribution libraries on the same network, data, recipe and real retrainings.

    .venv/bin/pip install --no-deps --target .cache/peers -r bench/requirements-peers.lock   # once
    python bench/peers.py                          # MNIST 4 vs 9 MLP, n = 1,000, lr 1e-3, t 200: lr·t = 0.2
    python bench/peers.py --task cnn_pretrained    # the pretrained CNN, n = 300, lr 0.01, t 100: lr·t = 1

Tasks (`--task`; `--n`, `--lr`, `--t` default to the task's, in TASKS), trained by full-batch gradient
descent on the mean loss, float32, weight decay `--wd`:
- `mlp`: bench/fidelity.py's (real MNIST 4 vs 9, the first `--n` training samples, pixels standardized,
  MLP 784-1024-1 from init seed 0);
- `cnn_pretrained`: the validate stage's pretrained cell of bench/table1.py (MNIST 4 vs 9 in [0, 1], the
  paper's CNN with its body trained on the other eight digits and a fresh seeded head).

Every method is asked the same question: τ[i, j] = f(x_j) − f₋ᵢ(x_j), how much training sample i raises the
output at validation target x_j (sui: the exact leave-one-out effect of the network linearized at w0,
sui_core.studies.attribution; peers: bench/peer_methods.py, their settings printed).
From τ, against two kinds of real retraining (cached under /tmp/sui_fidelity):

- **LOO**: the network retrained without each of `--samples` seeded samples (as bench/fidelity.py);
  F-SI_i = Σ_j τ[i, j]² against the real Σ_j (f(x_j) − f₋ᵢ(x_j))²: Pearson and Spearman.
- **LDS**: the network retrained on `--subsets` seeded subsets keeping `--fraction` of the samples
  (sui_core.studies.datamodels); each method predicts f_S(x_j) by Σ_{i∈S} τ[i, j] (additive); sui also by
  exact group removal (`sui (group)`). LDS = mean over targets of the Spearman across subsets.

Each method runs in a fresh process (spawned): its seconds are its own work (no imports), its peak
RSS the process's maximum (`ru_maxrss`), so imports and data count for every method alike.
Prints one table, with each method's ratios to sui.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import queue as queue_module
import resource
import time

import numpy as np
import torch
from fidelity import CACHE, load, truth
from scipy.stats import pearsonr, spearmanr
from table1 import pretrained_model

from sui_core.config import DataConfig, ModelConfig
from sui_core.data.splits import load_source
from sui_core.network.outputs import targets
from sui_core.network.training import train_full_batch
from sui_core.studies.datamodels import DatamodelScore, random_subsets, real_subset_outputs

CHECKPOINTS = 4  # parameter snapshots along the run, evenly spaced, the last = trained (TracIn, TRAK ensembles)
TASKS = {  # the defaults of --n, --lr, --t per task
    "mlp": {"n": 1000, "lr": 1e-3, "t": 200},
    "cnn_pretrained": {"n": 300, "lr": 0.01, "t": 100},  # bench/table1.py's cnn_pretrained_wd0 cell
}


def load_task(task: str, n: int):
    """(model at w0, x, y, x_val) of `task` on its first `n` training samples."""
    if task == "mlp":
        return load(n)
    data = DataConfig(classes=[4, 9], label_noise=0.0, max_train=n)
    raw = load_source(data)
    model_cfg = ModelConfig(arch="cnn")
    model, note = pretrained_model(model_cfg, data, raw.train.input_shape)
    print(note, flush=True)
    return (
        model.float(),
        torch.as_tensor(raw.train.x).float(),
        targets(raw.train.label, 2),
        torch.as_tensor(raw.val.x).float(),
    )


def lds_truth(model, x, y, x_val, args) -> tuple[np.ndarray, np.ndarray, float]:
    """(kept (m, n), real outputs (m, n_val), seconds) of the real network trained on each subset (cached)."""
    key = json.dumps([args.n, args.lr, args.t, args.wd, args.subsets, args.fraction, args.seed, args.task])
    path = CACHE / f"lds-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    kept = random_subsets(len(x), args.subsets, args.fraction, args.seed)
    if path.is_file():
        saved = np.load(path)
        return kept, saved["real"], float(saved["seconds"])
    started = time.perf_counter()
    real = real_subset_outputs(model, x, torch.as_tensor(y).float(), x_val, None, kept, args.lr, args.t, args.wd, True)
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, real=real, seconds=seconds)
    return kept, real, seconds


def trained_run(model, x, y, args) -> list[dict[str, torch.Tensor]]:
    """The full-data run's parameters at CHECKPOINTS evenly spaced steps (the last: the trained network)."""
    at = {round(args.t * (c + 1) / CHECKPOINTS) for c in range(CHECKPOINTS)}
    kept: list[dict[str, torch.Tensor]] = []

    def keep(step, params, first_run):
        if step in at:
            kept.append({name: p[0].clone() for name, p in params.items()})

    weights = torch.ones(1, len(x))
    train_full_batch(model, x, torch.as_tensor(y).float(), weights, args.lr, args.t, args.wd, callback=keep)
    return kept


def sui_tau(model, x, y, x_val, args, kept) -> dict:
    """sui's τ (the exact effects of the linearized model) and its group-removal predictions."""
    from sui_core.config import JacobianConfig
    from sui_core.linearized.estimate import linearize
    from sui_core.linearized.solver import Recipe
    from sui_core.studies.attribution import effect_blocks
    from sui_core.studies.datamodels import linearized_subset_outputs

    started = time.perf_counter()
    recipe = Recipe(args.lr, args.wd, args.t, "discrete")
    lin = linearize(model, x, x_val, JacobianConfig(projection="exact"))
    basis = lin.basis()
    residual = y - lin.f0
    tau = np.zeros((len(x), len(x_val)))
    for start, effect in effect_blocks(basis, residual, recipe, basis.val_rows):
        tau[start : start + len(effect)] = effect[:, :, 0]
    seconds = time.perf_counter() - started
    with torch.no_grad():
        f0_val = model(x_val).double().numpy()
    predicted, part = linearized_subset_outputs(basis, residual, recipe, f0_val, basis.val_rows, None, kept)
    return {"tau": tau, "seconds": seconds, "group": predicted["group"], "group_seconds": part["group"]}


def in_child(name: str, model, checkpoints, x, y, x_val, args, kept, queue) -> None:
    """Runs `name` and puts its result, or {"error": ...} when it raises, on `queue`."""
    torch.set_num_threads(args.threads)
    try:
        if name == "sui":
            result = sui_tau(model, x, y, x_val, args, kept)
            result["settings"] = "exact kernel at w0 from layer factors (jacobian.projection: exact), loo.tol 1e-14"
        else:
            from peer_methods import run_peer

            y = torch.as_tensor(y).float()
            peer = run_peer(name, model, checkpoints[-1], checkpoints, x, y, x_val, args.lr, args.t, args.wd)
            result = {"tau": peer.tau, "seconds": peer.seconds, "settings": peer.settings}
    except Exception as error:  # reported by the parent, which goes on with the other methods
        queue.put({"error": f"{type(error).__name__}: {error}"})
        return
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def run_method(name, *inputs) -> dict:
    """`in_child` in a spawned process; raises when it dies without a result (e.g. killed for memory)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=in_child, args=(name, *inputs, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=10)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"its process exited with code {process.exitcode} and no result") from None
    process.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def row(name: str, tau: np.ndarray, left_out, real_fsi, kept, real_lds, seconds, peak, predicted=None) -> dict:
    fsi = (tau[left_out] ** 2).sum(1)
    if predicted is None:
        predicted = kept.astype(np.float64) @ tau  # additive: Σ_{i∈S} τ[i, j]
    score = DatamodelScore(kept, real_lds, {"p": predicted}, {})
    return {
        "method": name,
        "pearson": float(pearsonr(fsi, real_fsi)[0]),
        "spearman": float(spearmanr(fsi, real_fsi)[0]),
        "median_ratio": float(np.median(fsi / real_fsi)),  # scale: meaningful where τ estimates the change itself
        "lds": score.lds("p"),
        "seconds": seconds,
        "peak_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="mlp")
    parser.add_argument("--n", type=int, help="training samples (default: the task's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    parser.add_argument("--t", type=int, help="gradient-descent steps (default: the task's)")
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peers", default="all", help="comma-separated names of bench/peer_methods.PEERS, or all")
    args = parser.parse_args()
    for name, value in TASKS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    from peer_methods import PEERS

    names = list(PEERS) if args.peers == "all" else args.peers.split(",")
    torch.manual_seed(0)
    model, x, y, x_val = load_task(args.task, args.n)
    left_out, real_fsi, loo_seconds = truth(model, x, y, x_val, args, args.task)
    kept, real_lds, lds_seconds = lds_truth(model, x, y, x_val, args)
    print(
        f"truth: {args.samples} + 1 retrainings in {loo_seconds:.0f} s, {args.subsets} subsets of "
        f"{int(kept[0].sum())} in {lds_seconds:.0f} s; task {args.task}, n = {len(x)}, {len(x_val)} targets, "
        f"lr·t = {args.lr * args.t:g}",
        flush=True,
    )
    checkpoints = trained_run(model, x, y, args)
    inputs = (model, checkpoints, x, y, x_val, args, kept)
    rows, settings = [], {}
    sui = run_method("sui", *inputs)
    settings["sui"] = sui["settings"]
    rows.append(row("sui", sui["tau"], left_out, real_fsi, kept, real_lds, sui["seconds"], sui["peak_mib"]))
    group_seconds = sui["seconds"] + sui["group_seconds"]
    rows.append(
        row("sui (group)", sui["tau"], left_out, real_fsi, kept, real_lds, group_seconds, sui["peak_mib"], sui["group"])
    )
    print(rows[0], rows[1], sep="\n", flush=True)
    for name in names:
        try:
            result = run_method(name, *inputs)
        except Exception as error:  # a peer that fails is reported, the others still run
            print(f"{name}: failed: {error}", flush=True)
            continue
        settings[name] = result["settings"]
        rows.append(row(name, result["tau"], left_out, real_fsi, kept, real_lds, result["seconds"], result["peak_mib"]))
        print(rows[-1], flush=True)
    base = rows[0]
    print("\n| method | LOO Pearson | LOO Spearman | median est./real | LDS | seconds | peak RSS MiB | time / sui |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['pearson']:.3f} | {r['spearman']:.3f} | {r['median_ratio']:.3g} | {r['lds']:.3f} | "
            f"{r['seconds']:.1f} | "
            f"{r['peak_mib']:.0f} | {r['seconds'] / base['seconds']:.1f}× |"
        )
    print("\nsettings:")
    for name, text in settings.items():
        print(f"- {name}: {text}")


if __name__ == "__main__":
    main()
