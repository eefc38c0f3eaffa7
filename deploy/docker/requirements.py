"""Print the requirements pyproject.toml pins, one a line, for a pip install in an image build.

    python requirements.py                                   # triptych's runtime dependencies
    python requirements.py --extra sglang --drop transformers

Installing them before the code is copied lets the dependency layer stay cached while the code
changes. ``--drop`` leaves out packages another pin overrides (SGLang pins its own transformers).
"""

import argparse
import re
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], drop: list[str]) -> list[str]:
    """The dependencies (plus those of `extras`), without the packages named in `drop`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    dropped = {name.lower() for name in drop}
    return [r for r in wanted if re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() not in dropped]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--drop", action="append", default=[])
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.extra, args.drop)))


if __name__ == "__main__":
    main()
