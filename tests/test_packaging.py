"""Packaging: the data/ folder installs as gcvit_data, so it neither shadows nor is shadowed by the `data`
folder or module of a user's own project, and setup.cfg lists every package of the source tree."""
import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "gcvit").rglob("__init__.py")}
    found |= {".".join(("gcvit_data", *p.parent.relative_to(REPO / "data").parts))
              for p in (REPO / "data").rglob("__init__.py")}
    assert listed == found, "setup.cfg [options] packages must list every package folder"
    assert cfg["options"]["package_dir"].split() == ["gcvit_data", "=", "data"]


def test_no_source_imports_the_bare_name_data():
    offenders = []
    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts or not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n == "data" or n.startswith("data.")]
    assert not offenders, offenders


def test_a_users_own_data_package_and_ours_coexist(tmp_path):
    """In a project with its own data/ package, both import: the user's as `data`, ours as `gcvit_data`."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("OWNER = 'user'\n")
    code = ("import data, gcvit_data.loaders, gcvit_data.index; "
            "print(data.OWNER, gcvit_data.loaders.__name__, gcvit_data.index.DataError.__module__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["user", "gcvit_data.loaders", "gcvit_data.errors"]


def test_the_config_and_the_variant_names_import_without_torch():
    """train.py validates its config before the model code loads, and DALI's feeder workers (which re-import
    the main module) stay small: neither gcvit.config nor the variant list may pull in torch or timm."""
    code = ("import sys, gcvit, gcvit.config; names = gcvit.list_models(); "
            "print(len(names), sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["8", "[]"]


def test_train_py_rejects_a_bad_value_before_loading_torch():
    code = ("import runpy, sys\nsys.argv = ['train.py', 'debug=tiny', 'trainer.precision=fp8']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint('torch' in sys.modules, 'timm' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert "trainer.precision='fp8' is invalid" in run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "False False", run.stdout
