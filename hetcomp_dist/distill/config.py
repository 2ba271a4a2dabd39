"""The student's settings (the ``distill`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hetcomp_dist.config import Where, check_metric, check_name, check_ranges, check_unique, check_uri


@dataclass
class DistillConfig:
    RENAMED: ClassVar[dict[str, str]] = {"max_seconds": "max_train_seconds"}   # stored configs' older names
    method: Literal["hetcomp", "final_ensemble", "bpr"] = "hetcomp"
    teachers: list[str] = field(default_factory=list)   # default: every teacher of the run config
    dim: int = 6
    init_std: float = 0.01           # embeddings start as N(0, init_std^2), as in the authors' code
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # adam: one dense Adam over both tables (every user row moves at every step: O(users) a step).
    # rowwise_adam: the user table's rows in the batch only (distill/optim.py), the item table dense.
    optimizer: Literal["adam", "rowwise_adam"] = "adam"
    batch_size: int = 1024           # train interactions per batch; their unique users form the loss batch
    batch_unit: Literal["interactions", "users"] = "interactions"   # users: batches of batch_size users, each once per epoch (KD only)
    max_epochs: int = 1000
    max_train_seconds: float = 0.0   # > 0: stop at the first evaluation after this much training time (evaluation not counted)
    eval_every: int = 10             # also the DKC period p
    patience: int = 5                # evaluations without valid improvement
    select_metric: str = "recall@50"
    target_size: int = 100           # |T_u|
    observed_size: int = 10          # |P_u|
    lo_weight: float = 0.01
    lr_weight: float = 0.005
    temperature: float = 10.0        # rank importance exp(-r / temperature)
    alpha: float = 1.05
    decay: float = 0.995
    dkc_switch: Literal["reference", "strict"] = "reference"   # when L_R replaces L_O (dkc.switched)
    # epochs: the threshold counts epochs (the reference). progress: a check at which valid select_metric
    # rose by less than dkc_stall (relative) moves every pair on (dkc.threshold)
    dkc_schedule: Literal["epochs", "progress"] = "epochs"
    dkc_stall: float = 0.01
    score_clamp: float = 40.0
    # Debiasing (ALGORITHM.md §7); 0 switches each off, and they combine.
    dissensus_target: float = 0.0    # strategy A, lambda: discount teachers' consensus on popular items in T_u
    dissensus_rule: Literal["consensus", "contested", "popularity"] = "consensus"  # strategy A's discount (dissensus.py)
    dissensus_weight: float = 0.0    # strategy B, gamma: up-weight target items few teachers agree on (and niche)
    ipw: float = 0.0                 # baseline, eta: weight target items' loss terms by count(i)^-eta (mean 1 per user)
    pop_penalty: float = 0.0         # baseline, beta: evaluate s_ui - beta * std_u(s) * pop(i) (post hoc, no retraining)
    sampled_negatives: int = 0       # 0: exact softmax over all unobserved items; n: n uniform samples, log-Q corrected
    # dense: every worker holds the whole item table; its gradient is all-reduced whole and stepped by dense
    # Adam (O(items) a step). rows (sampled_negatives > 0 only): the item table is split by rows across workers;
    # a step fetches the rows some rank looks up from their owners, sums their gradients back to them, and each
    # owner steps its own rows by row-wise Adam (distill/student.py, distill/optim.py)
    item_updates: Literal["dense", "rows"] = "dense"
    seed: int = 0
    threads: int = 2
    out: str | None = None           # default: <run>/distill/<method>
    checkpoint: bool = True          # write <out>/checkpoints/epoch-N at every evaluation, resume from them
    # equal: every teacher counts alike (the paper); valid: teacher t weighs valid_metric_t^p, the power p
    # (0 = equal, ...) chosen by the final ensemble's valid select_metric (never test)
    teacher_weights: Literal["equal", "valid"] = "equal"
    workers: int = 1                 # Ray Train workers (hetcomp distill --ray, jobs/distill.py)
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    # Where the loop computes (hetcomp_dist/device.py): auto = the GPU when torch sees one (under Ray: cuda
    # exactly when gpus_per_worker > 0). A resource, not a setting of the result: checkpoints and outputs
    # written on one device are resumed and reused on another.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    RANGES: ClassVar[tuple[str, ...]] = (
        "dim >= 1", "init_std > 0", "lr > 0", "weight_decay >= 0", "batch_size >= 1", "max_epochs >= 1",
        "max_train_seconds >= 0", "eval_every >= 1", "patience >= 1", "target_size >= 1", "observed_size >= 1",
        "lo_weight >= 0", "lr_weight >= 0", "temperature > 0", "alpha > 0", "decay > 0", "decay <= 1", "dkc_stall >= 0",
        "score_clamp > 0", "dissensus_target >= 0", "dissensus_weight >= 0", "ipw >= 0", "pop_penalty >= 0",
        "sampled_negatives >= 0", "seed >= 0", "threads >= 1", "workers >= 1", "cpus_per_worker >= 0",
        "gpus_per_worker >= 0")

    def validate(self, where: Where) -> None:
        """Ranges and names on their own; ``select_metric``'s K against the run's ks is RunConfig's check."""
        check_ranges(self, where, self.RANGES)
        check_metric(where.at("select_metric"), self.select_metric)
        check_name(self.method, where.at("method"))
        for i, name in enumerate(self.teachers):
            check_name(name, where.at("teachers").at(i))
        check_unique(where.at("teachers"), self.teachers)
        if self.out is not None:
            check_uri(where.at("out"), self.out)
        if self.item_updates == "rows" and (self.sampled_negatives == 0 or self.method == "bpr"):
            raise where.at("item_updates").error(
                "rows needs the sampled denominator of a distillation method (sampled_negatives > 0, method "
                "hetcomp or final_ensemble): otherwise every item row has a gradient at every step")
        if self.device == "cpu" and self.gpus_per_worker > 0:
            raise where.at("gpus_per_worker").error(f"{self.gpus_per_worker:g} GPU(s) reserved, but device is cpu: "
                                                    "they would stay idle (set device: auto or cuda)")
