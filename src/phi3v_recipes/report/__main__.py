"""`python -m phi3v_recipes.report <run dir | sweep dir> [key=value ...]`: write `<dir>/report.html`.

Settings (gallery size, thumbnail size, plot size) are those of conf/report.yaml, overridden by key=value
arguments. Exit status 0 with the report's path printed; 2 with one sentence for a directory that holds no run or
sweep, or an unknown setting.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from phi3v_recipes.errors import ConfigError
from phi3v_recipes.report import load_settings, write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3v_recipes.report",
                                     description="Write report.html for a run directory or a sweep directory.")
    parser.add_argument("directory", type=Path, help="a run directory (run.output_dir) or a sweep directory (-m)")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="overrides of conf/report.yaml, e.g. gallery.size=100 gallery.thumbnail_px=160")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.directory, load_settings(args.settings))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
