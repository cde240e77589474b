"""Every documented command works: each shell line of a fenced bash block in README.md and docs/*.md is
classified and checked. train.py commands (also under torchrun, launch/torchrun.sh, sbatch) compose, as
`--cfg job` would, to what their presets and overrides say; `python -m` tools and scripts answer --help
with every option the line uses (gcvit.plot runs on generated metrics); the README's fresh-machine lines
are what CI runs. Every relative link resolves, the README's model numbers are what gcvit.summary measures,
and docs/config.md is current."""
from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gcvit import list_models
from gcvit.config import Config, from_hydra, register, with_demo_default
from gcvit.config_docs import DOC, markdown
from gcvit.config_help import keys

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GLOBAL_GROUPS = ("experiment", "debug")  # @package _global_ presets, merged after the other groups
INSTALL = ("python3 -m venv ", ". .venv/bin/activate", "pip install ")  # only in the fresh-machine lines
EXTERNAL = ("wandb", "ruff", "hf")  # other projects' tools: their options are theirs to document
register()


def _lines(page: Path) -> list[str]:
    """The shell lines of a page's ```bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


COMMANDS = [(page.relative_to(REPO).as_posix(), line) for page in PAGES for line in _lines(page)]


def _unlaunched(argv: list[str]) -> list[str]:
    """A command without its `srun [opts]` or `torchrun [opts] -m` prefix (`python -m MOD ...` remains)."""
    if argv[0] == "srun":
        return argv[next(i for i, a in enumerate(argv) if i and not a.startswith("-")):]
    if argv[0] == "torchrun" and "-m" in argv:
        return ["python", *argv[argv.index("-m"):]]
    return argv


def _kind(argv: list[str]) -> str:
    """What a command is, hence how it is checked."""
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1] == "train.py":
        return "train"
    if argv[0] == "torchrun" or argv[0] == "launch/torchrun.sh" or argv[0] == "sbatch":
        return "train"
    if argv[:2] == ["python", "-c"]:
        return "snippet"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if argv[:2] == ["python", "-m"]:
        return "module"
    if argv[0] == "python" and argv[1].endswith(".py"):
        return "script"
    if argv[0] == "bash" and argv[1].endswith(".sh"):
        return "bash"
    if argv[0] in EXTERNAL:
        return "external"
    return "unknown"


def _parts(line: str) -> list[list[str]]:
    """The commands of a line, split at `&&`; the install steps of the fresh-machine lines are checked
    against CI separately and left out here."""
    parts = [shlex.split(p) for p in line.split("&&")]
    return [p for p in parts if not any(" ".join(p).startswith(i) for i in INSTALL)]


# ---- train.py commands: compose, and compare with what the presets and overrides say

def _train_args(argv: list[str]) -> list[str]:
    """The Hydra arguments of a train.py command under any launcher (launcher options dropped)."""
    if argv[0] == "sbatch":
        argv = argv[argv.index("launch/slurm.sbatch"):]
    elif argv[0] == "torchrun":
        argv = argv[argv.index("train.py"):]
    return [a for a in argv[1:] if "=" in a and not a.startswith("-") or a in ("-m", "--multirun")]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or prefix.endswith("overrides."):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _preset(group: str, option: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(flat values, group choices of its defaults list) of conf/<group>/<option>.yaml."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    choices = {}
    for entry in node.pop("defaults", []):  # type: ignore[union-attr]
        (key, value), = entry.items()
        choices[key.removeprefix("override /")] = value
    prefix = "" if group in GLOBAL_GROUPS else f"{group}."
    return _flat(node, prefix), choices


def _expected(overrides: list[str]) -> dict[str, Any]:
    """Key -> value the command must compose to: conf/config.yaml's group choices, replaced by those of the
    chosen global presets, then by the command's; their files merged in Hydra's order; then the overrides."""
    parser = OverridesParser.create()
    parsed = [parser.parse_override(o) for o in overrides]
    top = (CONF / "config.yaml").read_text()
    choices = {m.group(1): m.group(2) for m in re.finditer(r"\n  - (\w+): (\w+)", top)}
    named = {o.key_or_group.lstrip("+"): o.value() for o in parsed if "." not in o.key_or_group and "/" not in
             o.key_or_group and (CONF / o.key_or_group.lstrip("+")).is_dir()}
    choices.update(named)
    globals_ = [(g, choices[g]) for g in GLOBAL_GROUPS if choices.get(g) not in (None, "null")]
    for g, option in globals_:
        choices.update({k: v for k, v in _preset(g, option)[1].items() if k not in named})
    expected: dict[str, Any] = {}
    for group, option in choices.items():
        if group not in GLOBAL_GROUPS and (CONF / group / f"{option}.yaml").is_file():
            expected.update(_preset(group, option)[0])
    for g, option in globals_:
        expected.update(_preset(g, option)[0])
    for o in parsed:
        if "." in o.key_or_group and not o.key_or_group.startswith("hydra"):
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else None
            expected[o.key_or_group] = parser.parse_override(f"x={value}").value() if value else o.value()
    return expected


def _compose(overrides: list[str]) -> dict[str, Any]:
    """The validated config of `python train.py OVERRIDES` (first member of a sweep)."""
    first = []
    for o in with_demo_default(overrides):
        if o.startswith("hydra") or o.startswith("-"):
            continue  # Hydra's own settings (launcher, sweep dir): not part of the job's config
        key, _, value = o.partition("=")
        first.append(f"{key}={value.split(',')[0]}" if "," in value and "[" not in value else o)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=first)
        config = from_hydra(cfg, list_models)  # validation: one bad value raises SystemExit
    return _flat(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def _check_train(argv: list[str]) -> None:
    args = _train_args(argv)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    got, want = _compose(overrides), _expected(with_demo_default(overrides))
    wrong = {k: (got.get(k, "<missing>"), v) for k, v in want.items() if got.get(k, "<missing>") != v}
    assert not wrong, f"composes differently from its presets and overrides (got, expected): {wrong}"
    is_demo = with_demo_default(overrides) != overrides
    assert (got["name"] == "demo") == is_demo, "the demo must be exactly the command that names nothing"
    if not is_demo and not any(a.startswith("debug=") for a in overrides):
        assert got["model.overrides"] == {}, "a run naming its model must not carry the demo's reduced one"
    if argv[0] == "launch/torchrun.sh":
        _check_options(argv, _bash_help("launch/torchrun.sh"))
    if argv[0] == "sbatch":
        assert (REPO / "launch" / "slurm.sbatch").is_file()


# ---- tools and scripts: --help, and every option the line uses appears in it

def _bash_help(script: str) -> str:
    res = subprocess.run(["bash", str(REPO / script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and script in res.stdout, f"{script} --help: {res.stderr}"
    return res.stdout


def _python_help(argv: list[str]) -> str:
    """--help of `python -m MOD ...` or `python SCRIPT ...`, run in this process (imports are shared)."""
    leading = []  # positional words before the first option: sub-commands, paths (not overrides)
    for a in argv[2 if argv[1] != "-m" else 3:]:
        if a.startswith("-"):
            break
        if "=" not in a:
            leading.append(a)
    target = argv[2] if argv[1] == "-m" else str(REPO / argv[1])
    out, old_argv, old_path = io.StringIO(), sys.argv, list(sys.path)
    sys.argv = [target, *leading, "--help"]
    if argv[1] != "-m":  # as `python SCRIPT` runs it: the script's folder first (its sibling modules)
        sys.path.insert(0, str(Path(target).parent))
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            if argv[1] == "-m":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    assert exit_.value.code in (0, None), f"{' '.join(argv[:3])} --help exited {exit_.value.code}"
    assert "usage" in out.getvalue().lower(), out.getvalue()[:500]
    return out.getvalue()


def _check_options(argv: list[str], help_text: str) -> None:
    used = {a.split("=")[0] for a in argv if a.startswith("--")}
    missing = sorted(o for o in used if not re.search(rf"{re.escape(o)}(?![\w-])", help_text))
    assert not missing, f"options not in its --help: {missing}"


def _check_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    records = [{"kind": "train", "step": s, "epoch": 0, "loss": 2.0 / s, "lr": 1e-3, "img_per_s": 50.0}
               for s in (1, 2, 3)] + [{"kind": "eval", "step": 3, "epoch": 0, "top1": 50.0, "top5": 90.0,
                                        "ema_top1": 40.0, "ema_top5": 80.0, "count": 10}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from gcvit.plot import main as plot_main

    monkeypatch.chdir(tmp_path)
    plot_main(["runs/demo"])
    assert (run / "curves.png").stat().st_size > 1000


@pytest.mark.filterwarnings("ignore:'.*' found in sys.modules:RuntimeWarning")  # runpy of a loaded module
@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_documented_command_works(page: str, line: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in map(_unlaunched, _parts(line)):
        kind = _kind(argv)
        if kind == "train":
            _check_train(argv)
        elif kind == "module" and argv[2] == "gcvit.plot":
            _check_plot(tmp_path, monkeypatch)
        elif kind in ("module", "script"):
            _check_options(argv, _python_help(argv))
            overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
            if overrides:  # a tool that takes train.py's overrides (gcvit.doctor): they compose the same way
                _check_train(["python", "train.py", *overrides])
        elif kind == "snippet":
            compile(argv[2], f"{page}: python -c", "exec")  # runs nothing (downloads, files it lacks)
        elif kind == "bash":
            script = REPO / argv[1]
            assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0, f"{script} syntax"
        else:
            assert kind in ("pytest", "external"), f"{page}: no rule checks `{' '.join(argv)}`; add one here"


def test_readme_fresh_machine_lines_are_what_ci_runs() -> None:
    """The README's install + tests line is .ci/run's command; the install + demo line differs at the end."""
    readme = [line for line in _lines(REPO / "README.md") if line.startswith("python3 -m venv")]
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert len(readme) == 2 and ci == [readme[1]]
    assert readme[0].rsplit("&&", 1)[0] == readme[1].rsplit("&&", 1)[0]
    assert readme[0].endswith("&& python train.py") and readme[1].endswith("&& python -m pytest -q")


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/slurm.sbatch", "launch/local_slurm.sh"])
def test_launchers_answer_help(script: str) -> None:
    assert _bash_help(script).startswith(("Launch", "Multi-node", "A real one-node"))


def test_train_py_help_and_cfg_job_match_the_schema_and_compose() -> None:
    """`train.py --help` lists every group option and key with its doc; `--cfg job` of the README's eval
    command is what the in-process compose above checks."""
    cmd = [sys.executable, str(REPO / "train.py")]
    eval_args = ["mode=eval", "experiment=in1k_gcvit_tiny", "data.root=/data/imagenet", "checkpoint=c.pth"]
    procs = [subprocess.Popen([*cmd, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in (["--help"], [*eval_args, "--cfg", "job"])]
    (help_text, _), (job, err) = (p.communicate(timeout=300) for p in procs)
    assert all(p.returncode == 0 for p in procs), err
    for k in keys(Config):
        assert f"{k.name} ({k.type} = " in help_text and k.doc in help_text, k.name
    for option in ("in1k_gcvit_tiny", "gcvit_large", "synthetic", "light", "tiny", "slurm"):
        assert f"  {option} " in help_text
    got = _flat(OmegaConf.to_container(OmegaConf.create(job), resolve=False))
    assert got["mode"] == "eval" and got["model.img_size"] == 224 and got["model.overrides"] == {}
    assert got["trainer.device"] == "auto" and got["trainer.precision"] == "bf16"
    assert got["name"] == "in1k_gcvit_tiny"


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_model_numbers_are_measured() -> None:
    from gcvit.summary import measure

    rows = re.findall(r"^\| `(gcvit_\w+)` \| ([\d.]+) \| ([\d.]+) \|", (REPO / "README.md").read_text(), re.M)
    assert sorted(r[0] for r in rows) == sorted(list_models())
    for name, params, gmacs in rows:
        m = measure(name)
        assert (f"{m['params_m']:.2f}", f"{m['gmacs']:.2f}") == (params, gmacs), name


def test_config_reference_is_current() -> None:
    assert DOC.read_text() == markdown(), "docs/config.md is stale: run `python -m gcvit.config_docs --write`"
