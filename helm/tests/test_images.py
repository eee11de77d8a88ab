"""The Containerfiles and the test script keep their promises (static checks; no image is built here)."""

from __future__ import annotations

import re

import pytest

import chartlib


@pytest.mark.parametrize("service", list(chartlib.SERVICES))
def test_containerfile(service):
    text = (chartlib.ROOT / service / "Containerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage"
    runtime = stages[-1][0]
    assert "distroless" in runtime, f"runtime image {runtime} should be minimal and shell-less"
    # The production profile (fat LTO, see Cargo.toml), and the binary it makes.
    assert re.search(rf"cargo build --profile production --locked -p {service} --bin {service}\b", text)
    assert f"target/production/{service} " in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), "numeric non-root USER (runAsNonRoot checks it)"
    assert re.search(rf'^ENTRYPOINT \["/usr/local/bin/{service}"\]', text, re.M), "exec-form entrypoint, no shell"
    # The build and runtime Debian releases agree (glibc).
    assert "bookworm" in stages[0][0] and "debian12" in runtime


def test_containerignore_keeps_the_context_small():
    ignore = (chartlib.ROOT / ".containerignore").read_text().split()
    for entry in ("target", ".git", ".stack", ".venv-helm"):
        assert entry in ignore


def test_test_script_pins_its_tools():
    text = (chartlib.ROOT / "scripts" / "test-helm").read_text()
    for pin in ("helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0", "checkov==3.3.30"):
        assert f'"{pin}"' in text
    assert re.search(r'"PyYAML==6\.0\.\d+"', text) and re.search(r'"pytest==[\d.]+"', text)
    assert "set -euo pipefail" in text and "CKV_SKIP_PACKAGE_UPDATE_CHECK=true" in text
