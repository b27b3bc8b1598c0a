"""`sui top`, `sui suspects` and `sui explain`: the latest scores, suspected labels and attributions, as tables."""

from __future__ import annotations

import numpy as np

from stages import paths
from sui_core.artifacts import open_output
from sui_core.errors import SuiError
from sui_core.io import read_parquet
from sui_core.linearized.scores import SCORES

TEXT_WIDTH = 70  # characters of a text source's texts shown per row (whitespace collapsed)


def _short(text: str | None, width: int = TEXT_WIDTH) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def top_table(n: int, score: str = "fsi") -> str:
    """Two blocks of rows: the n highest and the n lowest samples by `score`."""
    if score not in SCORES:
        raise SuiError(f"--score: unknown score {score!r} (choose one of {', '.join(SCORES)})")
    if n <= 0:
        raise SuiError(f"--n: must be > 0, got {n}")
    table = read_parquet(open_output(paths.SCORES, stage="score").file(paths.SCORES_FILE.name)).to_pydict()
    class_names = open_output(paths.PREPARED, stage="prepare").meta["summary"]["class_names"]
    values = np.asarray(table[score])
    order = np.argsort(-values, kind="stable")
    texts = table.get("text")  # only text sources (data.text_column) have it
    w = max([5, *(len(str(c)) for c in class_names)])  # label columns as wide as the longest class name
    header = f"{'fsi_rank':>8} {'sample_id':>9} {'label':>{w}} {'clean':>{w}} {'noisy':>5} {'source':<14} {score:>12}"
    header += "  text" if texts is not None else ""
    lines = []
    for title, idx in (
        (f"{min(n, len(order))} most informative by {score} (nats)", order[:n]),
        (f"{min(n, len(order))} least informative by {score} (nats)", order[::-1][:n]),
    ):
        lines += ["", title, header]
        for i in idx:
            lines.append(
                f"{table['rank_fsi'][i]:>8} {table['sample_id'][i]:>9} "
                f"{class_names[table['label'][i]]!s:>{w}} {class_names[table['clean_label'][i]]!s:>{w}} "
                f"{'yes' if table['noisy'][i] else '':>5} {table['source'][i]:<14} {values[i]:>12.4e}"
                + (f"  {_short(texts[i])}" if texts is not None else "")
            )
    return "\n".join(lines[1:])


def suspects_table(n: int) -> str:
    """The n most suspect labels of the latest suspects stage, with how they were chosen."""
    if n <= 0:
        raise SuiError(f"--n: must be > 0, got {n}")
    out = open_output(paths.SUSPECTS, stage="suspects")
    table = read_parquet(out.file(paths.SUSPECTS_FILE.name)).slice(0, n).to_pydict()
    cal = out.meta["calibration"]
    precision = "-" if cal["estimated_precision"] is None else f"{cal['estimated_precision']:.2f}"
    texts = table.get("text")
    known = table.get("known_error")  # only where the data carries known wrong labels
    w = max([9, *(len(str(v)) for v in table["label"] + table["predicted"])])
    lines = [
        f"{cal['flagged']} of the labels flagged (estimated precision {precision}, recall "
        f"{cal['estimated_recall']:.2f}, target precision {cal['target_precision']}); estimated share of wrong labels "
        f"{cal['estimated_error_rate']:.3f}; detector {cal['chosen']}, chosen on {len(cal['copies'])} flipped copies",
        f"{'rank':>5} {'sample_id':>9} {'label':>{w}} {'predicted':>{w}} {'flagged':>7} {'suspicion':>11}"
        + (f" {'known':>5}" if known is not None else "")
        + ("  text" if texts is not None else ""),
    ]
    for i in range(len(table["rank"])):
        lines.append(
            f"{table['rank'][i]:>5} {table['sample_id'][i]:>9} {table['label'][i]:>{w}} {table['predicted'][i]:>{w}} "
            f"{'yes' if table['flagged'][i] else '':>7} {table['suspicion'][i]:>11.4e}"
            + (f" {'wrong' if known[i] else '':>5}" if known is not None else "")
            + (f"  {_short(texts[i])}" if texts is not None else "")
        )
    return "\n".join(lines)


SPLIT_NAMES = {"val": "validation", "test": "test"}


def explain_table(sample_id: int, n: int, verify: bool = False) -> str:
    """One target (of attribute.split) of the latest attribute stage: its prediction, its n top proponents and
    opponents with their labels and support, and how far the single-sample effects add up; with `verify`
    the top proponent's support by really retraining the network without it (the recorded recipe)."""
    if n <= 0:
        raise SuiError(f"--n: must be > 0, got {n}")
    out = open_output(paths.ATTRIBUTION, stage="attribute")
    if not out.meta.get("enabled"):
        raise SuiError(f"{paths.ATTRIBUTION}: the attribute stage is off (set attribute.enabled: true, then dvc repro)")
    table = read_parquet(out.file(paths.INFLUENCES_FILE.name)).to_pydict()
    if sample_id not in table["target_id"]:
        shown = ", ".join(map(str, table["target_id"][:5]))
        raise SuiError(f"sample {sample_id}: not among the {len(table['target_id'])} targets explained ({shown}, …)")
    t = table["target_id"].index(sample_id)
    split = out.meta["params"]["attribute"]["split"]
    train = read_parquet(open_output(paths.PREPARED, stage="prepare").file("train.parquet"), ["sample_id", "label"])
    names = [str(c) for c in open_output(paths.PREPARED, stage="prepare").meta["summary"]["class_names"]]
    label_of = dict(zip(train.column("sample_id").to_pylist(), train.column("label").to_pylist()))
    prediction = ", ".join(f"{v:.3f}" for v in table["prediction"][t])
    ratio = ", ".join(f"{v:.3f}" for v in table["additivity"][t])
    lines = [
        f"{SPLIT_NAMES[split]} sample {sample_id}: label {table['label'][t]}, predicted {table['predicted'][t]} "
        f"(outputs {prediction}); Σ of single-sample effects / all removed at once: {ratio}",
        "support: how far the prediction moves away from its class when the sample is left out "
        "(exact, linearized model; < 0: towards it)",
    ]
    for title, ids, values in (
        ("proponents", table["proponent_id"][t], table["proponent_support"][t]),
        ("opponents", table["opponent_id"][t], table["opponent_support"][t]),
    ):
        lines += ["", f"{min(n, len(ids))} top {title}", f"{'rank':>5} {'sample_id':>9} {'label':>9} {'support':>11}"]
        for rank, (i, v) in enumerate(zip(ids[:n], values[:n]), start=1):
            lines.append(f"{rank:>5} {i:>9} {names[label_of[i]]:>9} {v:>11.4e}")
    if verify:
        lines += ["", verify_line(out, table, t, names)]
    return "\n".join(lines)


def verify_line(out, table: dict, t: int, names: list[str]) -> str:
    """The top proponent of target row t really left out: one retraining of the network without it."""
    from sui_core.config import TrainingConfig
    from sui_core.data.splits import read_split
    from sui_core.network.models import load_model
    from sui_core.network.outputs import targets
    from sui_core.studies.attribution import retrained_support

    training = TrainingConfig(**out.meta["params"]["training"])
    steps = training.whole_steps("sui explain --verify")
    prepared = open_output(paths.PREPARED, stage="prepare")
    split = out.meta["params"]["attribute"]["split"]
    train, explained = (read_split(prepared.file(f"{name}.parquet")) for name in ("train", split))
    target = int(np.flatnonzero(explained.sample_id == table["target_id"][t])[0])
    proponent = table["proponent_id"][t][0]
    row = int(np.flatnonzero(train.sample_id == proponent)[0])
    real = retrained_support(
        load_model(open_output(paths.MODEL, stage="model").path)[0],
        train.x,
        targets(train.label, train.num_classes),
        explained.x[target],
        names.index(table["predicted"][t]),
        row,
        training.lr,
        steps,
        training.weight_decay,
    )
    estimate = table["proponent_support"][t][0]
    return (
        f"verify: the real network retrained without {proponent} ({steps} steps): support {real:.4e}, "
        f"linearized estimate {estimate:.4e} (ratio {estimate / real if real else float('nan'):.3f})"
    )
