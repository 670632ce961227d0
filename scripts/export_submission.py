"""Exports a self-contained AlgoPerf competition submission folder.

Example:
  python scripts/export_submission.py --optimizer=nadamw --framework=pytorch \
    --averaging=lawa --ruleset=external --name=polyak_nadamw_lawa \
    --authors="Ada Lovelace" --affiliations="Analytical Engines" --out=export/polyak_nadamw_lawa
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from polyak.algoperf.export import (
    AVERAGING_MODES,
    FRAMEWORKS,
    OPTIMIZERS,
    RULESETS,
    ExportError,
    ExportRequest,
    export_submission,
)

flags.DEFINE_string("optimizer", "nadamw", f"One of {OPTIMIZERS}.")
flags.DEFINE_string("framework", "pytorch", f"One of {FRAMEWORKS}.")
flags.DEFINE_string("averaging", "lawa", f"One of {AVERAGING_MODES}.")
flags.DEFINE_string("ruleset", "external", f"One of {RULESETS}.")
flags.DEFINE_string("name", None, "Submission name, also the folder name in the leaderboard repo.")
flags.DEFINE_string("authors", "", "Comma-separated author names.")
flags.DEFINE_string("affiliations", "", "Comma-separated affiliations.")
flags.DEFINE_string("out", None, "Folder to write (must be empty unless --force).")
flags.DEFINE_bool("force", False, "Replace a non-empty --out folder.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv
    name = FLAGS.name or f"polyak_{FLAGS.optimizer}_{FLAGS.averaging}_{FLAGS.framework}"
    out = Path(FLAGS.out) if FLAGS.out else Path("export") / name
    try:
        request = ExportRequest(
            optimizer=FLAGS.optimizer,
            framework=FLAGS.framework,
            averaging=FLAGS.averaging,
            ruleset=FLAGS.ruleset,
            name=name,
            authors=FLAGS.authors,
            affiliations=FLAGS.affiliations,
            out=out,
            force=FLAGS.force,
        )
        written = export_submission(request)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {out}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
