"""An installed wheel, not only a checkout, finds its prompts and models.toml."""

import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_wheel_carries_prompts_and_models_toml(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("malt_local-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "malt_local/_data/models.toml" in names
    for role in ("generator", "verifier", "refiner"):
        assert f"malt_local/_data/prompts/{role}.j2" in names
        # The shipped paper set (`--prompts paper`), every task variant included.
        for variant in ("", ".csqa", ".code"):
            assert f"malt_local/_data/prompts/paper/{role}{variant}.j2" in names
    # `malt view` serves its templates and stylesheet from the package: nothing from the network.
    for page in ("base", "_charts", "tree", "pairs", "evals", "run", "questions", "training"):
        assert f"malt_local/view/templates/{page}.html" in names
    assert "malt_local/view/static/view.css" in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import malt_local.paths as p, malt_local.prompts as pr;"
        "print(p.__file__); print(p.data_path('prompts')); print(p.data_path('models.toml'));"
        "print(sorted(pr.PromptSet().hashes())); print(pr.PromptSet('paper').folder)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    ).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert out[1] == str(target / "malt_local/_data/prompts")
    assert out[2] == str(target / "malt_local/_data/models.toml")
    assert "generator.csqa.j2" in out[3] and "paper" not in out[3]
    assert out[4] == str(target / "malt_local/_data/prompts/paper")
