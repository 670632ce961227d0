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

from polyak.algoperf.export import ExportError, ExportRequest, export_submission
from polyak.algoperf.submission_api import FRAMEWORKS, RULESETS, SUBMISSIONS
from polyak.averaging.config import MODES

flags.DEFINE_string("optimizer", "nadamw", f"One of {SUBMISSIONS}.")
flags.DEFINE_string("framework", "pytorch", f"One of {FRAMEWORKS}.")
flags.DEFINE_string("averaging", "lawa", f"One of {MODES}.")
flags.DEFINE_string("ruleset", "external", f"One of {RULESETS}.")
flags.DEFINE_string(
    "name", None, "Folder name in the leaderboard repository (lowercase, no spaces)."
)
flags.DEFINE_string(
    "display_name", "", "submission_name as shown on the leaderboard (default: derived)."
)
flags.DEFINE_string("version", "1.0", "submission_info.yml version, e.g. 1.0.")
flags.DEFINE_string("authors", "", "Comma-separated author names.")
flags.DEFINE_string("affiliations", "", "Comma-separated affiliations.")
flags.DEFINE_string(
    "out", None, "Folder to write (default export/<name>); never '.', the checkout or above."
)
flags.DEFINE_bool("force", False, "Replace --out when it holds an earlier export (only then).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
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
            display_name=FLAGS.display_name,
            version=FLAGS.version,
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
