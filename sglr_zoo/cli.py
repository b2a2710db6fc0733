"""The `sglr-zoo` command: train, eval, list, push, export, ... A user's mistake is one line and exit code 2."""

from __future__ import annotations

import argparse
import shlex
import sys

from sglr_zoo.errors import UserError


def _train(args: argparse.Namespace) -> None:
    from sglr_zoo.recipe import load_recipe
    from sglr_zoo.training import train

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, command=args.command)


def _list(args: argparse.Namespace) -> None:
    import timm

    print("\n".join(timm.list_models("*_cifar")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglr-zoo", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="adversarially train a model from a YAML recipe",
                                description="Train from a recipe; `key.sub=value` overrides win over the file. "
                                            "Multi-process: `accelerate launch train.py RECIPE ...`.")
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart_cifar10.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. schedule.epochs=10 run.seed=1")
    train.set_defaults(func=_train)

    listing = commands.add_parser("list", help="list the architectures and zoo models")
    listing.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["sglr-zoo", *argv])
    try:
        args.func(args)
    except UserError as error:
        print(f"sglr-zoo {args.name}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
