"""The config schema read as text: each key's type, default and one-line comment, the preset groups of conf/,
and train.py's --help (the library half of gcvit.config_docs, which gcvit.config uses without a cycle)."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Groups in the order a reader meets them; hydra/launcher is a Hydra group of our own (sweeps on SLURM).
GROUPS = ("experiment", "debug", "model", "data", "aug", "optim", "sched", "trainer", "logger",
          "hydra/launcher")
_FIELD_DOC = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


@dataclass
class Key:
    """One leaf of the schema."""

    name: str  # dotted key, e.g. trainer.seed
    type: str  # the annotation as written, e.g. "int | None"
    default: Any  # the schema default (what no preset changes)
    doc: str  # the field's one-line comment


def _field_docs(cls: type) -> dict[str, str]:
    """field name -> its trailing comment in the class source."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_DOC.match(line)
        if m:
            docs.setdefault(m.group(1), m.group(2).strip())
    return docs


def keys(cls: type, prefix: str = "", strict: bool = True) -> list[Key]:
    """Every leaf key of a config dataclass, depth first, in declaration order; `strict`: a field without
    its one-line comment is an error (docs/config.md), else it reads "undocumented" (--help must work)."""
    hints, docs, out = typing.get_type_hints(cls), _field_docs(cls), []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += keys(hints[f.name], f"{name}.", strict)
            continue
        if strict and not docs.get(f.name):
            raise ValueError(f"{cls.__name__}.{f.name} has no one-line doc comment; add `# what it means`")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append(Key(name, str(f.type), default, docs.get(f.name, "undocumented")))
    return out


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).replace("'", "")


def _described(path: Path) -> str:
    """The first comment sentence of a preset file."""
    lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    text = " ".join(ln for ln in lines if not ln.startswith("@package") and not ln.startswith("Run:"))
    first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", text)[0]  # the first sentence; "e.g. x" does not end it
    return first.rstrip(".") + "." if text else ""


def defaults() -> dict[str, str]:
    """group -> its default option in conf/config.yaml (none without a checkout's conf/)."""
    out: dict[str, str] = {}
    if not (CONF / "config.yaml").is_file():
        return out
    for line in (CONF / "config.yaml").read_text().splitlines():
        m = re.match(r"\s+- (?:override )?([\w/]+): (\w+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def groups() -> dict[str, list[tuple[str, str]]]:
    """group -> [(option, description)] from conf/<group>/*.yaml."""
    return {g: [(p.stem, _described(p)) for p in sorted((CONF / g).glob("*.yaml"))]
            for g in GROUPS if (CONF / g).is_dir()}


def _group_default(group: str, defaults: dict[str, str]) -> str:
    if group == "experiment":
        return "none; demo when no model, data set or preset is named"
    return {"null": "none"}.get(defaults.get(group, "none"), defaults.get(group, "none"))


def _short(text: str, width: int = 86) -> str:
    return text if len(text) <= width else text[: text.rfind(" ", 0, width - 3)] + " ..."


def help_template(schema: type) -> str:
    """The Hydra help template of train.py (hydra/help=gcvit): usage, groups, the keys of `schema`."""
    chosen, lines = defaults(), [
        "train.py: train or evaluate GC ViT. Usage: python train.py [group=option ...] [key=value ...]",
        "",
        "  python train.py                     the embedded demo on CPU (the default when no model,",
        "                                      data set or preset is named on the command line)",
        "  python train.py experiment=in1k_gcvit_tiny data.root=/data/imagenet      the paper's recipe",
        "  python train.py mode=eval experiment=in1k_gcvit_tiny data.root=/data/imagenet checkpoint=PATH",
        "  python train.py ... --cfg job       print the composed config and exit",
        "Without experiment=, model= and data= start from the paper's recipe (gcvit_tiny on ImageNet).",
        "A run directory keeps its recipe: docs/training.md (resume guard). Full reference: docs/config.md.",
        "",
        "== Groups (group=option) ==",
    ]
    for group, options in groups().items():
        lines.append(f"{group} (default: {_group_default(group, chosen)})")
        lines += [f"  {opt:<22} {_short(desc)}" for opt, desc in options]
    lines += ["", "== Keys (key=value; type = schema default; presets change some defaults) =="]
    for k in keys(schema, strict=False):
        lines.append(f"{k.name} ({k.type} = {show(k.default)})")
        lines.append(f"    {k.doc}")
    lines += ["", "Hydra's own flags: --cfg job|hydra|all, -m (multirun), --info, --hydra-help."]
    text = "\n".join(lines) + "\n"
    # string.Template takes $ as its marker and OmegaConf takes ${...}: show both literally.
    return text.replace("$", "$$").replace("$${", "$\\${")
