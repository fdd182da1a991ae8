"Shared set-up of the test suite: quick settings, the installed `fundus-lab` program and small synthetic datasets."
import os

os.environ["IN_TEST"] = "1"  # before any fundus_lab import: every module shrinks its work under test

import shutil, subprocess, sys, tempfile
os.environ.setdefault("FUNDUS_LAB_CACHE", tempfile.mkdtemp(prefix="fundus_lab_cache_"))  # the default cache, kept out of ~/.cache
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parent.parent
TINY_MODEL = ["--model-name", "test_efficientnet", "--no-pretrained", "--image-size", "64", "--batch-size", "8",
              "--epochs", "1", "--device", "cpu"]


def find_program() -> str | None:
    "The `fundus-lab` console script of the running Python's environment (or the PATH)."
    return shutil.which("fundus-lab", path=str(Path(sys.executable).parent)) or shutil.which("fundus-lab")


@pytest.fixture(scope="session")
def run_cli():
    "Run the installed `fundus-lab` program: `run_cli(*args, **env)` -> CompletedProcess with text output."
    program = find_program()
    if program is None:
        pytest.fail("The fundus-lab program is not installed: run `pip install -e .` in the repository first.")

    def run(*args, timeout=300, **env):
        return subprocess.run([program, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "IN_TEST": "1", **env})
    return run


@pytest.fixture(scope="session")
def tiny_model() -> list[str]:
    "`fundus-lab train` options for a one-epoch run of a tiny randomly initialised network on 64-pixel images."
    return list(TINY_MODEL)


@pytest.fixture(scope="session")
def dr_dataset(tmp_path_factory) -> Path:
    "A 20-image APTOS-style dataset (labels.csv + images/) of synthetic photos, written once per test run."
    from fundus_lab.synth import write_dataset
    out = tmp_path_factory.mktemp("dr_data")
    write_dataset("dr", out, n=20, size=96, seed=0)
    return out


@pytest.fixture
def dataset_copy(dr_dataset, tmp_path) -> Path:
    "A private copy of `dr_dataset` that a test may damage."
    return Path(shutil.copytree(dr_dataset, tmp_path/"data"))
