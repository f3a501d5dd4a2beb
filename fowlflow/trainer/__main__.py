"""``python -m fowlflow.trainer --data ... --num_epochs ...``: the MLproject's ``main`` entry point."""

import logging
import sys

from fowlflow.trainer import lifecycle


def main(argv: list[str] | None = None) -> int:
    lifecycle.install()  # before the slow imports: `mlflow run` may be stopped at any moment
    try:
        return _main(argv)
    except lifecycle.Terminated as exc:
        print(f"fowlflow: stopped ({exc})", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fowlflow: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fowlflow.errors import FowlflowError
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    try:
        run(parse_args(argv))
    except FowlflowError as exc:
        print(f"fowlflow: error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
