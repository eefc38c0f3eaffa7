"""Print the requirements pyproject.toml pins, one a line, for a pip install in an image build.

    python requirements.py                   # triptych's runtime dependencies
    python requirements.py --extra profiling

Installing them before the code is copied lets the dependency layer stay cached while the code
changes.
"""

import argparse
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The dependencies, plus those of `extras`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.extra)))


if __name__ == "__main__":
    main()
