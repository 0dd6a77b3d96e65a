"""Helpers for tests that run fairseq's own CLI as a subprocess.

    result = run_hydra_train(CONFIG_DIR / "pretraining", "tiny_knn_ce",
                             [f"task.data={manifests}", "optimization.max_update=3"],
                             run_dir=tmp_path / "run")
    records = parse_json_log(result.stdout)       # every JSON record fairseq logged
    valid = last_record(records, "valid")         # {"valid_loss": 4.5, ...}

``run_hydra_train`` passes ``common.user_dir`` (the plugin folder this test process
imports, the same path fairseq will import) and ``hydra.run.dir``; a failed run raises
with the end of fairseq's output, so the test report shows fairseq's own error.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# fairseq_knnvq is imported inside the functions: conftest imports this module before any
# test module, and the plugin registers its fairseq parts only when it is imported
# after fairseq.

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
TINY_CORPUS = REPO_ROOT / "examples" / "tiny_corpus" / "LibriSpeech"

# "[2026-11-27 03:52:02,568][valid][INFO] - {...}": fairseq's JSON progress bar records,
# prefixed by hydra's logging format (a plain "{...}" line is accepted too).
_JSON_RECORD = re.compile(r"^(?:\[[^\]]*\]\[(?P<logger>[^\]]+)\]\[[A-Z]+\] - )?(?P<json>\{.*\})\s*$")
# How much of a failed run's output goes into the error message.
_FAILURE_TAIL_CHARS = 6000


def load_script(relative_path: str):
    """Imports a script of the repository (``examples/``, ``scripts/``), which the
    installed package does not hold, as a module named after its file."""
    import importlib.util
    import sys

    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def console_script(name: str) -> str:
    """Path of a console script installed next to this Python (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable} or on PATH")
    return found


def run_hydra_train(
    config_dir: Path,
    config_name: str,
    overrides: Sequence[str],
    run_dir: Path,
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Runs ``fairseq-hydra-train --config-dir DIR --config-name NAME overrides`` with the
    plugin as ``common.user_dir`` and ``hydra.run.dir=run_dir``; stdout and stderr are
    merged into ``result.stdout``. With ``check``, a non-zero exit raises AssertionError
    with the end of the output."""
    import fairseq_knnvq

    command = [
        console_script("fairseq-hydra-train"),
        "--config-dir",
        str(config_dir),
        "--config-name",
        config_name,
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    run_env = dict(os.environ, **(env or {}))
    # One thread per process: the runs are tiny, and CI shares two cores between jobs.
    run_env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=run_env,
        cwd=str(run_dir.parent),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"fairseq-hydra-train exited with {result.returncode}\ncommand: {' '.join(command)}\n"
            f"... {result.stdout[-_FAILURE_TAIL_CHARS:]}"
        )
    return result


def _number(value):
    """fairseq's JSON progress bar writes numbers as strings ("4.578")."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_json_log(text: str) -> List[Dict[str, object]]:
    """The JSON records of a fairseq log (``common.log_format=json``), in order, with
    numbers as floats and the logger name under ``"_logger"`` (``train_inner``, ``train``
    or the validation subset, e.g. ``valid``)."""
    records = []
    for line in text.splitlines():
        match = _JSON_RECORD.match(line.strip())
        if not match:
            continue
        try:
            record = json.loads(match.group("json"))
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        parsed = {key: _number(value) for key, value in record.items()}
        parsed["_logger"] = match.group("logger")
        records.append(parsed)
    return records


def records_of(records: List[Dict[str, object]], logger: str) -> List[Dict[str, object]]:
    return [record for record in records if record.get("_logger") == logger]


def last_record(records: List[Dict[str, object]], logger: str) -> Dict[str, object]:
    """The last record of one logger; AssertionError naming the loggers seen if none."""
    matching = records_of(records, logger)
    if not matching:
        seen = sorted({str(record.get("_logger")) for record in records})
        raise AssertionError(f"no {logger!r} record in the log; loggers seen: {seen}")
    return matching[-1]


def write_tiny_manifests(dest: Path) -> Path:
    """``train.tsv`` (shipped tiny corpus ``train/``) and ``valid.tsv`` (``dev/``) in
    ``dest``, written by the project's ``knnvq-manifest``; returns ``dest``."""
    from fairseq_knnvq.cli import manifest

    dest.mkdir(parents=True, exist_ok=True)
    for split, folder in (("train", "train"), ("valid", "dev")):
        manifest.main([str(TINY_CORPUS / folder), "--dest", str(dest), "--ext", "flac", "--split-name", split])
    return dest
