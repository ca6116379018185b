"""Print the requirements that the running Python does not already satisfy.

    python tools/pip_needed.py -r requirements.txt [-r more.txt] [REQ ...]

Reads requirement lines (PEP 508: ``name``, ``name>=1.2,<2``; comments and
blank lines ignored; environment markers honoured) and prints, shell-quoted on
one line, those whose distribution is not installed or whose installed version
is outside the requirement's range. The Makefile installs only these (pinned
by constraints.txt), so a machine that already has compatible packages, such
as a GPU machine with its own torch stack and no network, reuses them and
never needs the index. Exit status 0 in every case (2 for a malformed line).
"""
from __future__ import annotations

import shlex
import sys
from importlib import metadata

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement


def _lines(args):
    it = iter(args)
    for a in it:
        if a == "-r":
            with open(next(it)) as f:
                yield from f
        else:
            yield a


def needed(args) -> list:
    out = []
    for line in _lines(args):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(line)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(line)
    return out


def main(argv) -> int:
    try:
        need = needed(argv)
    except (InvalidRequirement, OSError, StopIteration) as exc:
        print(f"pip_needed: {exc}", file=sys.stderr)
        return 2
    print(" ".join(shlex.quote(r) for r in need))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
