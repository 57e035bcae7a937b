"""Parameters of the systolic-array exposure model, read from TOML and validated.

The defaults live in ``hardware/default_systolic.toml`` (with their sources); a user file
(``--hardware systolic:FILE.toml``) overrides only the fields it sets. Every error is one
:class:`~flipguard.errors.ConfigError` line naming the file and the field.

>>> cfg = load_systolic()
>>> cfg.rows, cfg.output_kib, cfg.protection["dram"]
(16, 64.0, 'secded')
>>> cfg.structure_weights()["dram"]  # DRAM is SEC-DED protected: no single-bit fault
0.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flipguard.errors import ConfigError
from flipguard.faults import FORMAT_NAMES

__all__ = ["SystolicConfig", "load_systolic", "DEFAULT_TOML", "DATAFLOWS", "STRUCTURES",
           "CELL_OF", "PROTECTIONS"]

DEFAULT_TOML = Path(__file__).parent / "hardware" / "default_systolic.toml"
_LONG = {"ws": "weight-stationary", "os": "output-stationary", "is": "input-stationary"}
DATAFLOWS = {**{v: k for k, v in _LONG.items()}, **{k: k for k in _LONG}}
#: storage structures of the array and the cell type each is built from
CELL_OF = {"pe": "flipflop", "weight_buffer": "sram", "activation_buffer": "sram",
           "output_buffer": "sram", "dram": "dram"}
STRUCTURES = tuple(CELL_OF)
PROTECTIONS = ("none", "secded")
_PROTECTABLE = ("weight_buffer", "activation_buffer", "output_buffer", "dram")
_FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}


def _default_rates() -> dict[str, float]:
    return {"sram": 1000.0, "flipflop": 1000.0, "dram": 1.0}


def _default_protection() -> dict[str, str]:
    return {"weight_buffer": "none", "activation_buffer": "none", "output_buffer": "none",
            "dram": "secded"}


@dataclass(frozen=True)
class SystolicConfig:
    """Parameters of the array (see ``hardware/default_systolic.toml``): geometry, buffer
    capacities (KiB), accumulator width per operand format, raw upset rates per cell type
    (FIT per Mbit) and SEC-DED protection per protectable structure."""

    rows: int = 16
    cols: int = 16
    dataflow: str = "weight-stationary"
    clock_mhz: float = 500.0
    weight_kib: float = 256.0
    activation_kib: float = 512.0
    output_kib: float = 64.0
    accumulator_bits: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FORMAT_NAMES, 32))
    rates: dict[str, float] = field(default_factory=_default_rates)
    protection: dict[str, str] = field(default_factory=_default_protection)
    source: str = "default"

    def __post_init__(self) -> None:
        defaults = {"accumulator_bits": dict.fromkeys(FORMAT_NAMES, 32),
                    "rates": _default_rates(), "protection": _default_protection()}
        for name, default in defaults.items():  # partial dicts keep the other defaults
            given = dict(getattr(self, name))
            bad = sorted(set(given) - set(default))
            if bad:
                raise ConfigError(f"systolic: unknown {name} key {bad[0]!r}; expected one of "
                                  f"{', '.join(default)}")
            object.__setattr__(self, name, {**default, **given})
        if any(v not in PROTECTIONS for v in self.protection.values()):
            raise ConfigError(f"systolic: protection values must be one of "
                              f"{', '.join(PROTECTIONS)}, got {self.protection}")
        if self.rows < 1 or self.cols < 1 or self.dataflow not in DATAFLOWS:
            raise ConfigError(f"systolic: expected rows, cols >= 1 and a dataflow in "
                              f"{', '.join(_LONG.values())}, got {self.rows}, {self.cols}, "
                              f"{self.dataflow!r}")
        if max(self.structure_weights().values()) <= 0:
            raise ConfigError(f"{self.source}: field 'rates': every structure has rate 0 or "
                              f"is SEC-DED protected, so no single-bit fault can occur")

    def capacity_bits(self, structure: str) -> float:
        """Capacity of a buffer in bits (``inf`` for the PE array and DRAM)."""
        kib = {"weight_buffer": self.weight_kib, "activation_buffer": self.activation_kib,
               "output_buffer": self.output_kib}.get(structure)
        return float("inf") if kib is None else kib * 1024 * 8

    def upset_rate(self, structure: str) -> float:
        """Raw upset probability of one bit in one cycle in ``structure`` (before ECC):
        ``FIT/Mbit * 1e-15 / (3.6e12 * clock_mhz * 1e-6)``."""
        fit_per_bit_hour = self.rates[CELL_OF[structure]] * 1e-15
        return fit_per_bit_hour / (3600.0 * self.clock_mhz * 1e6)

    def structure_weights(self, raw: bool = False) -> dict[str, float]:
        """Relative per-bit-cycle upset weight of each structure, normalised to the largest
        cell rate; 0 where SEC-DED corrects every single upset (unless ``raw``)."""
        top = max(self.rates.values())
        out = {}
        for s, cell in CELL_OF.items():
            w = self.rates[cell] / top if top > 0 else 0.0
            out[s] = 0.0 if (not raw and self.protection.get(s) == "secded") else w
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"array": {k: d[k] for k in ("rows", "cols", "dataflow", "clock_mhz")},
                "buffers": {k: d[k] for k in ("weight_kib", "activation_kib", "output_kib")},
                "accumulator_bits": dict(d["accumulator_bits"]), "rates": dict(d["rates"]),
                "protection": dict(d["protection"]), "source": self.source}


def _toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML needs Python >= 3.11 or 'tomli'") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: hardware file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start}); TOML files must be UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid TOML ({msg})") from None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
        and abs(v) != float("inf")


def _check(path: Path, where: str, value: Any, kind: str) -> Any:
    num = _is_num(value)
    is_int = num and isinstance(value, int)
    ok, want = {
        "count": (is_int and value >= 1, "a positive integer"),
        "positive": (num and value > 0, "a positive number"),
        "size": (num and value >= 0, "a non-negative number"),
        "rate": (num and value >= 0, "a non-negative rate in FIT per Mbit"),
        "dataflow": (value in DATAFLOWS, "one of " + ", ".join(_LONG.values())),
        "protection": (value in PROTECTIONS, "one of " + ", ".join(PROTECTIONS)),
        "ibits": (is_int and 8 <= value <= 64, "an integer accumulator width in 8..64"),
        "fbits16": (value in (16, 32), "16 or 32 (an accumulator of the operand format or "
                                       "fp32)"),
        "fbits32": (value == 32, "32 (an fp32 accumulator)"),
    }[kind]
    if not ok:
        raise ConfigError(f"{path}: field '{where}': expected {want}, got {value!r}")
    if kind == "dataflow":
        return _LONG[DATAFLOWS[value]]
    return float(value) if kind in ("positive", "size", "rate") else value


_SCHEMA: dict[str, dict[str, str]] = {
    "array": {"rows": "count", "cols": "count", "dataflow": "dataflow",
              "clock_mhz": "positive"},
    "buffers": {"weight_kib": "size", "activation_kib": "size", "output_kib": "size"},
    "accumulator_bits": {f: ("ibits" if f.startswith("int") else
                             "fbits32" if _FLOAT_BITS[f] == 32 else "fbits16")
                         for f in FORMAT_NAMES},
    "rates": {"sram": "rate", "flipflop": "rate", "dram": "rate"},
    "protection": dict.fromkeys(_PROTECTABLE, "protection"),
}
_DICT_SECTIONS = ("accumulator_bits", "rates", "protection")


def _read(f: Path, values: dict[str, Any], seen: set[str]) -> None:
    data = _toml(f)
    for section, fields in data.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{f}: unknown section [{section}]; expected one of "
                              f"{', '.join(_SCHEMA)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"{f}: field '{section}': expected a [{section}] table")
        for key, value in fields.items():
            kind = _SCHEMA[section].get(key)
            if kind is None:
                raise ConfigError(f"{f}: unknown field '{section}.{key}'; expected one of "
                                  f"{', '.join(_SCHEMA[section])}")
            value = _check(f, f"{section}.{key}", value, kind)
            seen.add(f"{section}.{key}")
            if section in _DICT_SECTIONS:
                values.setdefault(section, {})[key] = value
            else:
                values[key] = value


def load_systolic(path: str | Path | None = None, base: str | Path = DEFAULT_TOML
                  ) -> SystolicConfig:
    """The ``base`` configuration (default: the shipped TOML, which must set every field),
    overlaid with the TOML file ``path`` when given; a bad, unknown or (in ``base``)
    missing field raises one ConfigError line naming the file and the field.

    >>> load_systolic().to_dict()["buffers"]["weight_kib"]
    256.0
    """
    values: dict[str, Any] = {}
    seen: set[str] = set()
    base = Path(base)
    _read(base, values, seen)
    missing = [f"{s}.{k}" for s, fields in _SCHEMA.items() for k in fields
               if f"{s}.{k}" not in seen]
    if missing:
        raise ConfigError(f"{base}: missing field '{missing[0]}' (the base hardware file must "
                          f"set every field)")
    if path:
        _read(Path(path), values, seen)
    return SystolicConfig(**values, source=str(path) if path else "default")
