"""deploy/Dockerfile and deploy/build_image_offline.sh agree (no image is built here: that needs
minutes and a network; the script and deploy/smoke_test_image.sh do it by hand)."""

from __future__ import annotations

import re
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_offline_build_sets_only_args_the_dockerfile_uses():
    """A build arg the Dockerfile does not declare, or declares but never reads, is silently ignored:
    the offline build would then reach for Docker Hub or download.pytorch.org."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    script = (DEPLOY / "build_image_offline.sh").read_text()
    declared = set(re.findall(r"(?m)^ARG (\w+)", dockerfile))
    used = set(re.findall(r"\$\{(\w+)\}", dockerfile))
    passed = set(re.findall(r"--build-arg (\w+)=", script))
    read = set(re.findall(r"\^ARG (\w+)=", script))
    assert passed and read, "the patterns above no longer match the script"
    assert not (passed | read) - declared, f"not declared in deploy/Dockerfile: {(passed | read) - declared}"
    assert not passed - used, f"declared but never read in deploy/Dockerfile: {passed - used}"
