"""The README's own-data recipe, run as written on two small shared dumps (slow: about ten minutes; skipped
when ../shared/data is absent)."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, shared_file


def readme_recipe(name: str) -> str:
    """The bash block README.md marks `<!-- recipe: NAME -->`."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(rf"<!-- recipe: {name} -->\n```bash\n(.*?)```", text, re.S)
    assert match, f"README.md lost its {name} recipe block"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_recipe_runs_on_small_shared_dumps(tmp_path):
    dumps = " ".join(shared_file(site, "Posts.xml") for site in ("se-beer", "se-matheducators"))
    script = readme_recipe("own data")
    for line, replacement in ((r'^DUMPS=.*$', f'DUMPS="{dumps}"'), (r"^RUN=.*$", f"RUN={tmp_path}"),
                              (r'^PY=.*$', f'PY="{sys.executable}"')):
        script, n = re.subn(line, replacement, script, count=1, flags=re.M)
        assert n == 1, line
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=3000, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    verdicts = [line for line in out.stdout.splitlines() if "held-out questions under judge" in line]
    assert verdicts and "95% CI" in verdicts[0]
    for path in ("eval/report.md", "eval/frontier.png", "ppo/checkpoint-000040/adapter_model.safetensors"):
        assert os.path.exists(tmp_path / path), path
    assert out.stdout.strip().splitlines()[-1].strip()  # generate printed an answer


@pytest.mark.slow
def test_the_real_model_recipe_runs_scaled_down_on_one_dump(tmp_path):
    """The README's "StackLLaMA on a laptop" block on SmolLM2's GGUF file, as written but scaled down: one
    dump, two steps per stage, a handful of evaluation prompts (slow: several minutes on 2 cores)."""
    model = shared_file("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    coffee = shared_file("se-coffee", "Posts.xml")
    script = readme_recipe("real model")
    for pattern, replacement in ((r"^MODEL=.*$", f"MODEL={model}"), (r"^RUN=\S+", f"RUN={tmp_path}"),
                                 (r'PY="[^"]*"', f'PY="{sys.executable}"'),
                                 (r"--posts [^\n]*?\\\n", f"--posts {coffee} \\\n")):
        script, n = re.subn(pattern, replacement, script, count=1, flags=re.M)
        assert n == 1, pattern
    for flag, value in (("--max-steps", 2), ("--eval-every", 1), ("--eval-batches", 2), ("--eval-prompts", 2),
                        ("--num-prompts", 3), ("--response-min-length", 8), ("--response-max-length", 8),
                        ("--max-new-tokens", 8), ("--batch-size", 2), ("--mini-batch-size", 2)):
        script = re.sub(rf"{flag} \d+", f"{flag} {value}", script)
    script = re.sub(r"--epochs \d+", "--max-steps 2 --eval-batches 2", script)  # the RMs: an epoch is too long here
    script = re.sub(r"checkpoint-0000\d\d", "checkpoint-000002", script)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    for path in ("pairs/summary.json", "sft-merged/model.safetensors", "sft-merged/tokenizer.json",
                 "ppo/checkpoint-000002/adapter_model.safetensors", "eval/report.md"):
        assert os.path.exists(tmp_path / path), path
    verdicts = [line for line in out.stdout.splitlines() if "held-out questions under judge" in line]
    assert verdicts and "95% CI" in verdicts[0]
    assert out.stdout.strip().splitlines()[-1].strip()  # generate printed an answer
