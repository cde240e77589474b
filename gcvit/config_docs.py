"""Documentation of every config key and group, generated from the schema (gcvit/config.py, data/config.py)
and conf/: the text of `python train.py --help` and docs/config.md.

    python -m gcvit.config_docs            # print docs/config.md as it should be
    python -m gcvit.config_docs --write    # rewrite docs/config.md (tests fail while it is stale)
    python -m gcvit.config_docs --check    # exit 1 when docs/config.md is stale
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcvit.config import Config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DOC = REPO / "docs" / "config.md"
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


def keys(cls: type = Config, prefix: str = "", strict: bool = True) -> list[Key]:
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


def _show(value: Any) -> str:
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
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def _defaults() -> dict[str, str]:
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


def help_template() -> str:
    """The Hydra help template of train.py (hydra/help=gcvit): usage, groups, keys."""
    defaults, lines = _defaults(), [
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
        lines.append(f"{group} (default: {_group_default(group, defaults)})")
        lines += [f"  {opt:<22} {_short(desc)}" for opt, desc in options]
    lines += ["", "== Keys (key=value; type = schema default; presets change some defaults) =="]
    for k in keys(strict=False):
        lines.append(f"{k.name} ({k.type} = {_show(k.default)})")
        lines.append(f"    {k.doc}")
    lines += ["", "Hydra's own flags: --cfg job|hydra|all, -m (multirun), --info, --hydra-help."]
    text = "\n".join(lines) + "\n"
    # string.Template takes $ as its marker and OmegaConf takes ${...}: show both literally.
    return text.replace("$", "$$").replace("$${", "$\\${")


def _recipe() -> dict[str, Any]:
    """Every key's value in the paper's recipe (conf/config.yaml without the demo)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gcvit.config import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[])
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and not (prefix.endswith("overrides.") or prefix == "model.overrides."):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/config.md."""
    from gcvit.engine.recipe import MAY_CHANGE_ON_RESUME, may_change

    recipe, defaults = _recipe(), _defaults()
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m gcvit.config_docs --write` from gcvit/config.py, data/config.py",
        "and conf/; do not edit by hand -->",
        "",
        "Every key can be set on the command line as `key=value`; groups choose a preset file as",
        "`group=option`. `python train.py --help` prints the same reference, and",
        "`python train.py ARGS --cfg job` the composed config of a command.",
        "With no argument that names a model, data set or preset",
        "(`experiment=`, `debug=`, `model=`, `data=`, `model.name=`, `data.root=`), `train.py` adds",
        "`experiment=demo` (the embedded CPU demo); anything else starts from the paper's recipe. Column",
        "*recipe* is the composed value of `python train.py data.root=ROOT` (gcvit_tiny on ImageNet, the",
        "paper's recipe); *default* is the schema's.",
        "",
        "A run directory records its recipe (`RUN_DIR/recipe.yaml`); restarting it with a different value of",
        "any key not marked *may change* stops with one line (see [training](training.md#resume-guard)).",
        f"May change on resume: {', '.join(f'`{k}`' for k in MAY_CHANGE_ON_RESUME)}.",
        "",
        "## Groups",
        "",
        "| group | option | what |",
        "|---|---|---|",
    ]
    for group, options in groups().items():
        for opt, desc in options:
            mark = " (default)" if defaults.get(group) == opt else ""
            out.append(f"| `{group}` | `{opt}`{mark} | {_cell(desc)} |")
    section = None
    for k in keys():
        top = k.name.split(".")[0] if "." in k.name else "run"
        if top != section:
            section = top
            out += ["", f"## `{top}`" if top != "run" else "## Run", "",
                    "| key | type | default | recipe | resume | meaning |", "|---|---|---|---|---|---|"]
        rec = recipe.get(k.name, k.default)
        resume = "may change" if may_change(k.name) else ""
        out.append(f"| `{k.name}` | `{_cell(k.type)}` | `{_cell(_show(k.default))}` | "
                   f"`{_cell(_show(rec))}` | {resume} | {_cell(k.doc)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print, write or check docs/config.md."""
    ap = argparse.ArgumentParser(prog="python -m gcvit.config_docs", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {DOC.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {DOC.relative_to(REPO)} is stale")
    args = ap.parse_args(argv)
    text = markdown()
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    elif args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python -m gcvit.config_docs --write`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
