"""Settings of one architecture search (:class:`NASConfig`) and their validation.

>>> cfg = NASConfig(data="data/synth", out="runs/nas", trials=30)
>>> cfg.study_names()
['nas-systolic', 'nas-uniform']
>>> cfg.directions()
['maximize', 'maximize', 'minimize']
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flipguard.errors import ConfigError
from flipguard.nas.objectives import DIRECTIONS, OBJECTIVES, Fidelity, Settings
from flipguard.ra import parse_hardware

__all__ = ["NASConfig", "SAMPLERS", "resolve_hardware", "parse_objectives"]

SAMPLERS = ("tpe", "nsga2")


def resolve_hardware(text: str) -> str:
    """``uniform`` | ``memory`` | ``systolic`` | ``systolic:FILE.toml`` | ``FILE.toml``
    (a bare TOML file is a systolic array description).

    >>> from importlib.resources import files
    >>> toml = str(files("flipguard.ra") / "hardware" / "default_systolic.toml")
    >>> resolve_hardware(toml) == f"systolic:{toml}", resolve_hardware(" uniform")
    (True, 'uniform')
    """
    t = str(text).strip()
    if t.endswith(".toml") and not t.startswith("systolic:"):
        t = f"systolic:{t}"

    parse_hardware(t)
    return t


def parse_objectives(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"quality,ra,memory"`` -> a tuple of known, distinct objectives.

    >>> parse_objectives("ra, quality")
    ('ra', 'quality')
    """
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in OBJECTIVES]
    if bad or not items:
        raise ConfigError(f"--objectives: expected a comma list of {', '.join(OBJECTIVES)}, "
                          f"got {bad[0] if bad else 'nothing'!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"--objectives: an objective is listed twice in {','.join(items)!r}")
    return tuple(items)


@dataclass
class NASConfig:
    """One search: where, what space, how many trials, which exposure, which fidelities.

    ``hardware`` is the hardware-aware exposure; with ``compare_uniform`` a second study
    runs the same search under uniform exposure (same storage, same screening cache).
    ``screen`` / ``full`` are the two fidelities (short training and a fixed small RA budget
    for every trial; full training and the target RA margin for the front). ``front_max``:
    at most this many front architectures of each study are retrained."""

    data: str
    out: str
    trials: int = 30
    timeout: float | None = None
    hardware: str = "systolic"
    compare_uniform: bool = True
    objectives: tuple[str, ...] = ("quality", "ra", "memory")
    space: str = "cae"
    sampler: str = "tpe"
    workers: int = 1
    threads: int = 1
    seed: int = 0
    size: int = 64
    category: str | None = None
    val_fraction: float = 0.2
    defect_strength: float = 2.0
    startup_trials: int = 10
    population: int = 10
    front_max: int = 4
    study: str = "nas"
    retrain: bool = True
    screen: Fidelity = field(default_factory=lambda: Fidelity(8, 0.02, 256, 64))
    full: Fidelity = field(default_factory=lambda: Fidelity(30, 0.005, 2048, 128))
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        self.objectives = parse_objectives(self.objectives)
        self.hardware = resolve_hardware(self.hardware)
        hws = [self.hardware] + (["uniform"] if self.compare_uniform and
                                 self.hardware != "uniform" else [])
        self.settings.hardware = tuple(hws)
        self.settings.seed = self.seed

    def validate(self) -> None:
        """One-line :class:`ConfigError` for a bad setting (before any work)."""
        for name, v, lo in (("--trials", self.trials, 1), ("--workers", self.workers, 1),
                            ("--threads", self.threads, 1), ("--size", self.size, 8),
                            ("--front-max", self.front_max, 0),
                            ("--population", self.population, 2),
                            ("--startup-trials", self.startup_trials, 1),
                            ("--seed", self.seed, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got "
                              f"{self.sampler!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"--timeout: expected a positive number of seconds, got "
                              f"{self.timeout}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction: expected a value in (0, 1), got "
                              f"{self.val_fraction}")
        for name, f in (("--screen-epochs", self.screen), ("--full-epochs", self.full)):
            if f.epochs < 1 or f.ra_max_samples < 2:
                raise ConfigError(f"{name}: expected >= 1 epoch and >= 2 RA samples")
        if not self.study.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--study: expected letters, digits, '-' or '_', got {self.study!r}")
        self.settings.validate()

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    def directions(self) -> list[str]:
        return [DIRECTIONS[o] for o in self.objectives]

    def study_hardware(self) -> list[str]:
        """Exposure of each study: the hardware-aware one first."""
        return list(self.settings.hardware)

    def study_names(self) -> list[str]:
        return [f"{self.study}-{_slug(hw)}" for hw in self.study_hardware()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objectives"] = list(self.objectives)
        d["settings"] = self.settings.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NASConfig:
        d = dict(d)
        settings = dict(d.pop("settings"))
        settings["hardware"] = tuple(settings["hardware"])
        settings["targets"] = tuple(settings["targets"])
        return cls(**{**d, "screen": Fidelity(**d["screen"]), "full": Fidelity(**d["full"]),
                      "objectives": tuple(d["objectives"]), "settings": Settings(**settings)})

    def search_identity(self) -> dict[str, Any]:
        """The settings a resumed search must share (not trials, timeout, workers, ...)."""
        d = self.to_dict()
        for k in ("trials", "timeout", "workers", "threads", "front_max", "retrain", "full"):
            d.pop(k, None)
        d["data"] = str(Path(self.data).resolve())
        d.pop("out", None)
        return d


def _slug(hardware: str) -> str:
    """``systolic:cfg/my_npu.toml`` -> ``systolic-my_npu``; ``uniform`` -> ``uniform``."""
    name, _, arg = hardware.partition(":")
    text = f"{name}-{Path(arg).stem}" if arg else name
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
