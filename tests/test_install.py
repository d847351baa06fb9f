"""The project installs beside the Hugging Face stack and shadows none of it, from any folder.

Hugging Face's `kernels` package (which transformers requires) and this repository's kernels/ folder share a
name. The project's one import name is `rlhf_engine` (setup.py, train.use_checkout); these tests import
transformers' LLaMA classes and peft where the collision used to bite: in a process started in the
repository root, and from another folder after a regular, non-editable install into a scratch venv.
"""
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports transformers' LLaMA and peft (the oracles), Hugging Face's kernels when installed, and the engine's
# own kernels; prints where each came from.
PROBE = """
import importlib.util, json, sys
from transformers import LlamaConfig, LlamaForCausalLM
import peft
import rlhf_engine.kernels.logprobs as ours
import rlhf_engine.engine.model.llama as model
theirs = importlib.util.find_spec("kernels")
print(json.dumps({"ours": ours.__file__, "model": model.__file__, "peft": peft.__file__,
                  "theirs": theirs.origin if theirs else None, "llama": LlamaForCausalLM.__name__}))
"""


def run_probe(python: str, cwd: str, env: dict | None = None) -> dict:
    import json
    out = subprocess.run([python, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_transformers_peft_and_the_engine_import_in_the_repository_root():
    """`python -c` in the root puts the root first on sys.path: our kernels/ must not shadow theirs."""
    pytest.importorskip("peft")
    found = run_probe(sys.executable, cwd=ROOT)
    assert found["llama"] == "LlamaForCausalLM"
    assert found["ours"].startswith(ROOT) and found["ours"].endswith(os.path.join("kernels", "logprobs.py"))
    if hugging_face_kernels_installed():  # transformers >= 5.2x requires it; older stacks lack it
        assert found["theirs"] is not None and os.path.dirname(found["theirs"]) != os.path.join(ROOT, "kernels")
        assert found["theirs"].endswith(os.path.join("site-packages", "kernels", "__init__.py")), found["theirs"]


def hugging_face_kernels_installed() -> bool:
    from importlib import metadata
    try:
        return metadata.version("kernels") is not None
    except metadata.PackageNotFoundError:
        return False


def test_train_py_binds_rlhf_engine_to_its_own_checkout(tmp_path):
    """Started from another folder, `python CHECKOUT/train.py` runs the code beside it."""
    code = ("import runpy, sys; sys.argv = ['train.py', '--help']; import importlib.util as u;\n"
            f"spec = u.spec_from_file_location('train', {os.path.join(ROOT, 'train.py')!r});\n"
            "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "import rlhf_engine.engine.flags as f; print(f.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(ROOT, "engine", "flags.py")


def build_wheel(out_dir) -> str:
    pytest.importorskip("setuptools")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(out_dir), ROOT], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".whl")]
    return wheel


@pytest.mark.slow
def test_a_regular_install_owns_one_name_and_works_from_another_folder(tmp_path):
    """`pip install .` (no editable finder): files only under rlhf_engine/, then the oracles and the engine
    import side by side from a temporary folder, and the installed train.py script runs."""
    pytest.importorskip("peft")
    wheel = build_wheel(tmp_path / "wheel")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith((".dist-info", ".data"))} == {"rlhf_engine"}, top
    assert "rlhf_engine/kernels/logprobs.py" in names and "rlhf_engine/engine/model/llama.py" in names

    # A scratch venv that sees this venv's packages (torch, transformers, peft, kernels) through a .pth file
    # and gets the engine itself from the wheel, not from the editable finder.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    scratch_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    ours_site = sysconfig.get_paths()["purelib"]
    with open(os.path.join(scratch_site, "zz_parent_venv.pth"), "w") as f:
        f.write(ours_site + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                                "--no-index", wheel], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]

    # Hide the editable finder of the test venv: a regular install must stand on its own.
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = run_probe(python, cwd=str(elsewhere), env=env)
    assert found["ours"].startswith(scratch_site), found
    assert found["model"].startswith(scratch_site), found
    if hugging_face_kernels_installed():
        assert found["theirs"].startswith(ours_site), found
    script = subprocess.run([python, str(venv / "bin" / "train.py"), "sft", "--help"], cwd=elsewhere,
                            capture_output=True, text=True, env=env, timeout=300)
    assert script.returncode == 0 and "--model" in script.stdout, script.stderr[-2000:]
