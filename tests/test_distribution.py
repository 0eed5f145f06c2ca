"""The distribution: the wheel a clean clone builds (name, ranges, license, entry point, recipes as package data), that
wheel installed and run outside the repository, and recipe names resolving in this (editable) install."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mm.commands.train import recipe_names, resolve_recipe
from mm.errors import MMError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.relative_to(ROOT / "recipes").as_posix() for path in (ROOT / "recipes").glob("*/*.yaml"))


def clean_clone(destination: Path) -> Path:
    """The files a clone of this working tree would hold: tracked and untracked-but-not-ignored ones."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distribution")
    source = clean_clone(root / "clone")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (built,) = (root / "dist").glob("*.whl")
    return built


def test_wheel_holds_the_package_the_recipes_and_the_metadata(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.name.startswith("mm_vlm-")
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "mm").rglob("*.py") if "__pycache__" not in p.parts)
    assert [name for name in sources if name not in names] == []  # every subpackage is packaged
    packaged = sorted(name.removeprefix("mm/recipes/") for name in names if name.startswith("mm/recipes/")
                      and name.endswith(".yaml"))
    assert packaged == RECIPES and "mm/recipes/__init__.py" in names
    for data in [*(ROOT / "mm" / "assets").glob("*"), *(ROOT / "mm" / "serve" / "static").glob("*")]:
        assert data.relative_to(ROOT).as_posix() in names

    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(f"{info}/METADATA").decode()
    fields = [tuple(line.split(": ", 1)) for line in metadata.split("\n\n")[0].splitlines() if ": " in line]
    assert ("Name", "mm-vlm") in fields and ("License-Expression", "Apache-2.0") in fields
    requirements = [Requirement(value) for key, value in fields if key == "Requires-Dist"]
    runtime = {r.name: r for r in requirements if r.marker is None}
    assert [r for r in requirements if any(s.operator in ("==", "===") for s in r.specifier)] == []  # ranges only
    assert str(runtime["torch"].specifier) == ">=2.6" and str(runtime["torchvision"].specifier) == ">=0.21"
    assert runtime["transformers"].specifier.contains("5.4.0") and not runtime["transformers"].specifier.contains("6.0")
    assert archive.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert "[console_scripts]\nmm = mm.cli:main" in archive.read(f"{info}/entry_points.txt").decode()
    install = (ROOT / "tools" / "install.sh").read_text()  # the script keeps the known-good exact pair
    assert '"torch==2.14.1" "torchvision==0.29.1"' in install


@pytest.mark.slow
def test_installed_wheel_trains_a_packaged_recipe_outside_the_repository(wheel, tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(site)  # the installed wheel comes before this checkout's editable install

    def mm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(site / "bin" / "mm"), *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)

    where = subprocess.run([sys.executable, "-c", "import mm.recipes; print(mm.recipes.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)
    assert mm("--version").stdout.strip() == "mm 0.1.0"  # read from the mm-vlm distribution's metadata
    assert "--recipe NAME" in mm("train", "--help").stdout
    made = mm("make-synthetic", "--out", "data/synthetic", "--n", "24")  # the corpus the shipped recipes name
    assert made.returncode == 0, made.stderr
    trained = mm("train", "--recipe", "tiny/1_align", "--no-progress", "output_dir=runs/tiny",
                 "trainer.max_steps=2", "trainer.save_every=2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (work / "runs" / "tiny" / "final" / "mm_config.json").is_file()
    unknown = mm("train", "--recipe", "tiny/9_nothing")
    assert unknown.returncode == 2 and "no recipe 'tiny/9_nothing'" in unknown.stderr and "tiny/1_align" in unknown.stderr


def test_recipe_names_resolve_to_the_package_data(tmp_path):
    import mm.recipes

    assert sorted(f"{name}.yaml" for name in recipe_names()) == RECIPES
    assert Path(mm.recipes.__file__).parent == ROOT / "recipes"  # editable: the package data is the repo's folder
    assert resolve_recipe("lite/1_align") == resolve_recipe("lite/1_align.yaml") == ROOT / "recipes/lite/1_align.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("output_dir: x\n")
    assert resolve_recipe(str(own)) == own
    with pytest.raises(MMError, match=r"no recipe 'lite/nope'.*lite/1_align"):
        resolve_recipe("lite/nope")
