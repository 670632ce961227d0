"""Entrypoint of polyak's image: AlgoPerf's startup.sh flags or polyak's runner flags.

See polyak.runner.docker_entry for the flags and what each does.
"""

from __future__ import annotations

import sys

from polyak.runner.docker_entry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
