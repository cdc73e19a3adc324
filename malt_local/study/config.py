"""What a study is: one dataclass, read from a TOML file and flags, written back as TOML.

A study is fixed by its files, its model and every setting of its stages. `malt study` writes
the resolved config into `OUT/study.toml` when it begins; the same command later continues it,
and a flag or file that contradicts it is refused by name, as `malt run` refuses a resume under
other settings: one study folder holds one experiment, never two mixed. The TOML file is also
what someone else reruns (`malt study --config study.toml`), so paths in it are relative to the
file's own folder.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.training.settings import TrainSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The TOML tables and the fields each holds, in the order study.toml is written.
TABLES: dict[str, tuple[str, ...]] = {
    "study": ("train", "test", "model", "prompts", "task"),
    "run": ("n", "max_tokens", "temperature", "seed", "theta"),
    "export": ("keep_length_stopped",),
    "eval": ("votes", "seeds", "samples", "ablations", "ablation_votes"),
}
# The stage that first reads each table: a setting may still change until that stage has begun
# (a DPO learning rate chosen by a sweep on the finished trees' export, before training), never
# after, so a study never mixes two settings of one stage.
FIRST_READER = {"study": "trees", "run": "trees", "export": "export", "eval": "eval",
                "train": "train"}  # fmt: skip
# Names `--prompts` takes for the prompt sets malt ships, rather than a folder.
SHIPPED_PROMPTS = ("default", "paper")  # prompts.SHIPPED_SETS, without importing jinja
TRAIN_FIELDS = (
    "epochs",
    "dpo_epochs",
    "max_steps",
    "lr",
    "dpo_lr",
    "batch_size",
    "grad_accum",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "beta",
    "seed",
)


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of a study. The defaults are the paper's protocol at the small model's
    scale: n = 3 trees, majority vote of 3 at test time, two evaluation seeds."""

    train: str = ""
    test: str = ""
    model: str = ""
    prompts: str = ""  # "": the shipped default set
    task: str = ""  # "": detected from each file's rows
    n: int = 3
    max_tokens: int = 96
    temperature: float = 0.3
    seed: int = 0
    theta: float = 0.5  # a generator or verifier node is a positive when its value is above
    keep_length_stopped: bool = False  # export: nodes cut at max_tokens are no positives
    votes: int = 3
    seeds: int = 2
    samples: int = 0  # 0: every test question, under every seed
    # Also evaluate each role trained alone and SFT without DPO (one vote each: the ablation
    # asks which role the gain comes from, the headline comparison asks how large it is).
    ablations: bool = True
    ablation_votes: int = 1
    training: dict = field(default_factory=dict)  # TrainSettings fields that differ

    def validate(self) -> None:
        for name in ("train", "test", "model"):
            if not getattr(self, name):
                raise MaltError(f"a study needs --{name} (or a --config file that names it)")
        checks = [
            (1 <= self.n <= 6, f"--n must be in [1, 6] (got {self.n})"),
            (self.max_tokens >= 1, f"--max-tokens must be at least 1 (got {self.max_tokens})"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                f"--temperature must be a finite number >= 0 (got {self.temperature})",
            ),
            (0 <= self.theta <= 1, f"--theta must be in [0, 1] (got {self.theta})"),
            (1 <= self.votes <= 99, f"--votes must be in [1, 99] (got {self.votes})"),
            (1 <= self.seeds <= 99, f"--seeds must be in [1, 99] (got {self.seeds})"),
            (self.samples >= 0, f"--samples must be 0 (all) or more (got {self.samples})"),
            (
                1 <= self.ablation_votes <= self.votes,
                f"ablation_votes must be in [1, votes] (got {self.ablation_votes})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MaltError(message)
        unknown = set(self.training) - set(TRAIN_FIELDS)
        if unknown:
            raise MaltError(f"[train] has no setting {sorted(unknown)[0]!r}")
        self.train_settings().validate()

    def train_settings(self) -> TrainSettings:
        try:
            return TrainSettings(**self.training)
        except TypeError as exc:
            raise MaltError(f"[train]: {exc}") from None

    def record(self) -> dict:
        """The config as JSON for results.json (every training setting, defaults included)."""
        out = {k: v for k, v in asdict(self).items() if k != "training"}
        out["training"] = asdict(self.train_settings())
        return out


def _scalar_fields() -> dict[str, type]:
    return {f.name: f.type for f in fields(StudyConfig) if f.name != "training"}  # type: ignore[misc]


def read_toml(path: Path) -> StudyConfig:
    """A study from a TOML file; relative paths are taken from the file's folder."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaltError(f"study config not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MaltError(f"study config {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MaltError(f"study config {path} is not TOML: {exc}") from None
    values: dict = {}
    types = _scalar_fields()
    for table, content in data.items():
        if table == "train":
            if not isinstance(content, dict):
                raise MaltError(f"study config {path}: [train] must be a table")
            values["training"] = dict(content)
            continue
        if table not in TABLES or not isinstance(content, dict):
            raise MaltError(f"study config {path}: unknown table [{table}]")
        for key, value in content.items():
            if key not in TABLES[table]:
                raise MaltError(f"study config {path}: [{table}] has no setting {key!r}")
            values[key] = _typed(key, value, types[key], path)
    for name in ("train", "test"):
        if values.get(name):
            values[name] = _beside(path, values[name])
    prompts = values.get("prompts")
    if prompts and prompts not in SHIPPED_PROMPTS:
        values["prompts"] = _beside(path, prompts)
    model = values.get("model")
    if model and ("/" in model or model.endswith(".gguf")):  # a file, not a pulled alias
        values["model"] = _beside(path, model)
    return StudyConfig(**values)


def _beside(config: Path, value: str) -> str:
    return value if Path(value).is_absolute() else str((config.parent / value).resolve())


def _typed(key: str, value: object, kind: object, path: Path) -> object:
    wanted = {"str": str, "int": int, "float": (int, float), "bool": bool}[str(kind)]
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, wanted):
        raise MaltError(f"study config {path}: {key} must be a {kind} (got {value!r})")
    return float(value) if kind == "float" else value  # type: ignore[arg-type]


def to_toml(config: StudyConfig) -> str:
    """The config as the TOML `read_toml` reads (flat tables of strings, numbers, booleans)."""
    lines = ["# A malt study: rerun it with `malt study --config THIS_FILE --out FOLDER`.", ""]
    values = asdict(config)
    for table, names in TABLES.items():
        lines.append(f"[{table}]")
        lines += [f"{name} = {_value(values[name])}" for name in names]
        lines.append("")
    lines.append("[train]")
    lines += [f"{k} = {_value(v)}" for k, v in sorted(config.training.items())]
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) + '"'


def merge(base: StudyConfig, given: dict) -> StudyConfig:
    """`base` with the flags a user gave (None: not given)."""
    training = dict(base.training)
    training.update({k: v for k, v in given.pop("training", {}).items() if v is not None})
    changes = {k: v for k, v in given.items() if v is not None}
    return replace(base, **changes, training=training)


def differences(
    stored: StudyConfig, wanted: StudyConfig, begun: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """(refused, accepted): the settings in which `wanted` differs from the stored study, as flag
    texts, split by whether the stage that reads them has begun (`begun`; None: all have).
    The model is compared by its sha256 (an alias and its file are the same model), not here."""
    refused: list[str] = []
    accepted: list[str] = []
    a, b = stored.record(), wanted.record()
    reader = {name: FIRST_READER[table] for table, names in TABLES.items() for name in names}
    for key in a:
        if key == "model":
            continue
        if key == "training":
            texts = [f"[train] {k} {a[key][k]!r} (now {b[key][k]!r})" for k in a[key]
                     if a[key][k] != b[key][k]]  # fmt: skip
            stage = FIRST_READER["train"]
        else:
            texts = [f"{key} {a[key]!r} (now {b[key]!r})"] if a[key] != b[key] else []
            stage = reader[key]
        (refused if begun is None or stage in begun else accepted).extend(texts)
    return refused, accepted
