"""One codebase on both transformers versions: triptych's own requirements admit every version
SGLang 0.5.23 pins (so the ``sglang`` extra resolves), and this lane runs SGLang's pins."""

import importlib.metadata
import tomllib

from packaging.requirements import Requirement

from tests.stack import ROOT


def test_triptych_requirements_admit_sglangs_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    assert project["optional-dependencies"]["sglang"] == ["sglang==0.5.23"]
    pinned = 0
    for line in importlib.metadata.requires("sglang") or []:
        theirs = Requirement(line)
        if theirs.marker is not None and "extra" in str(theirs.marker):
            continue
        spec = [s for s in theirs.specifier if s.operator == "=="]
        if theirs.name.lower() in ours and spec:
            pinned += 1
            version = spec[0].version
            assert ours[theirs.name.lower()].specifier.contains(version), (theirs, version)
    assert pinned >= 2  # transformers and tokenizers at least


def test_this_lane_runs_sglangs_transformers() -> None:
    assert importlib.metadata.version("transformers") == "5.19.0"
    assert importlib.metadata.version("sglang") == "0.5.23"
