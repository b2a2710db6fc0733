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


def _eval(args: argparse.Namespace) -> None:
    from sglr_zoo.evaluate import evaluate_model, format_results, save_results

    results = evaluate_model(
        args.model, dataset=args.dataset, split=args.split, n=args.n, device=args.device, threat=args.threat,
        eps=args.eps, attacks=[a.strip() for a in args.attacks.split(",") if a.strip()], batch_size=args.batch_size,
        seed=args.seed, autoattack_version=args.autoattack_version,
        autoattack_attacks=args.autoattack_attacks.split(",") if args.autoattack_attacks else None,
        state_path=args.state_path, bf16_quick=args.bf16_quick, progress=True, command=args.command,
        weights=args.weights)
    print(format_results(results))
    print(f"wrote {save_results(results, args.out)}")


def _list(args: argparse.Namespace) -> None:
    import timm

    from sglr_zoo.zoo import list_models

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = ("name", "arch", "dataset", "threat", "eps", "clean %", "AA %", "weights")
    rows = [header] + [(r.name, r.arch, r.dataset, r.threat, r.eps, percent(r.clean), percent(r.autoattack),
                        "yes" if r.weights else "no") for r in list_models()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\nweights marked 'no' are not published yet: `sglr_zoo.load(NAME)` names the recipe that trains them.")
    print("\narchitectures (timm.create_model):")
    print("\n".join(f"  {name}" for name in timm.list_models("*_cifar")))


def _push(args: argparse.Namespace) -> None:
    from sglr_zoo.hub import push

    upload = push(args.run_or_folder, args.repo_id, which=args.which, results=args.results, private=args.private,
                  revision=args.revision, create_pr=args.create_pr, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(upload.files)} files to {args.repo_id}" + (f"@{args.revision}" if args.revision else "") + ":")
    for path, size in upload.files:
        print(f"  {size:>12,d}  {path}")
    print(f"model.safetensors sha256: {upload.sha256}")
    if args.dry_run:
        print("dry run: nothing uploaded")
    else:
        print(f"done: {upload.url}")


def _export(args: argparse.Namespace) -> None:
    from sglr_zoo.hub import export_folder, write_zoo_cards

    if args.zoo_cards:
        written = write_zoo_cards(args.runs_dir, args.out or "model_cards")
        print("\n".join(str(path) for path in written) or f"no zoo runs found under {args.runs_dir}/")
        return
    if not args.run_or_folder or not args.out:
        raise UserError("give RUN_OR_FOLDER and --out DIR (or --zoo-cards)")
    folder = export_folder(args.run_or_folder, args.out, which=args.which, results=args.results, repo_id=args.repo_id)
    print("\n".join(str(path) for path in sorted(folder.iterdir())))


def _export_robustbench(args: argparse.Namespace) -> None:
    import json

    from sglr_zoo.hub import export_robustbench

    entry = export_robustbench(args.run_or_folder, args.out, which=args.which, results=args.results)
    print(f"wrote {args.out}" if args.out else json.dumps(entry, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglr-zoo", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="adversarially train a model from a YAML recipe",
                                description="Train from a recipe; `key.sub=value` overrides win over the file. "
                                            "Multi-process: `accelerate launch train.py RECIPE ...`.")
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart_cifar10.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. schedule.epochs=10 run.seed=1")
    train.set_defaults(func=_train)

    ev = commands.add_parser("eval", help="clean and robust accuracy (PGD, CW, AutoAttack) with sanity checks",
                             description="Evaluate on the first N examples of a split, in order, and write one "
                                         "results JSON (the only source of the numbers on model cards).")
    ev.add_argument("model", help="a zoo name, model folder, run directory, local-dir:PATH, hf-hub:ORG/NAME, "
                                  "or a timm architecture with --weights")
    ev.add_argument("--weights", metavar="FILE.safetensors", help="a state dict for the architecture named as MODEL")
    ev.add_argument("--dataset", default="uoft-cs/cifar10", help="Hub id or local folder (SGLR_ZOO_DATA is honoured)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--threat", choices=["linf", "l2"], default="linf")
    ev.add_argument("--eps", default=None, help="e.g. 8/255 (the linf default) or 0.5 (the l2 default)")
    ev.add_argument("--attacks", default="clean,pgd20,cw20,autoattack",
                    help="comma-separated: clean, pgd<steps>, cw<steps>, autoattack")
    ev.add_argument("--n", type=int, default=1000, help="number of examples (the first n of the split)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--out", default="results.json", help="where to write the results JSON")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--autoattack-version", choices=["standard", "rand", "custom"], default="standard")
    ev.add_argument("--autoattack-attacks", default=None, metavar="apgd-ce,...",
                    help="sub-attacks for --autoattack-version custom: apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square")
    ev.add_argument("--state-path", default=None, metavar="FILE",
                    help="AutoAttack progress file; rerun with the same file to resume a killed run")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--bf16-quick", action="store_true", help="bf16 autocast for our PGD/CW only (never AutoAttack)")
    ev.set_defaults(func=_eval)

    listing = commands.add_parser("list", help="list the architectures and zoo models")
    listing.set_defaults(func=_list)

    def checkpoint_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("run_or_folder", metavar="RUN_OR_FOLDER", help="a run directory (runs/NAME) or a model folder")
        sub.add_argument("--which", choices=("best", "last"), default="best",
                         help="which export of a run (default best)")
        sub.add_argument("--results", help="the evaluator's results JSON (default: the run's results.json)")

    push = commands.add_parser("push", help="upload a run's model with its model card to the Hugging Face Hub",
                               description="Export weights, config, model card, recipe and results and upload them "
                                           "with huggingface_hub (token from HF_TOKEN or `hf auth login`).")
    checkpoint_args(push)
    push.add_argument("--repo-id", required=True, help="ORG/NAME, e.g. sglr-zoo/wrn34_10_cifar.sglr_linf8_c10")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload nothing")
    push.set_defaults(func=_push)

    export = commands.add_parser("export", help="write a Hub-ready model folder (weights, config, model card, ...)",
                                 description="Write a folder loadable with `timm.create_model('local-dir:OUT')`; "
                                             "with --zoo-cards, write model_cards/<name>.md for zoo runs that exist.")
    export.add_argument("run_or_folder", metavar="RUN_OR_FOLDER", nargs="?", help="a run directory or a model folder")
    export.add_argument("--out", help="the new folder (with --zoo-cards: the cards folder, default model_cards)")
    export.add_argument("--which", choices=("best", "last"), default="best",
                        help="which export of a run (default best)")
    export.add_argument("--results", help="the evaluator's results JSON (default: the run's results.json)")
    export.add_argument("--repo-id", help="the Hub repo the card should point to")
    export.add_argument("--zoo-cards", action="store_true", help="write cards for every zoo entry whose run exists")
    export.add_argument("--runs-dir", default="runs", help="where the zoo runs are (with --zoo-cards)")
    export.set_defaults(func=_export)

    robustbench = commands.add_parser("export-robustbench", help="write a RobustBench model_info JSON",
                                      description="Numbers come from the results JSON; AutoAttack must have been run.")
    checkpoint_args(robustbench)
    robustbench.add_argument("--out", help="the JSON file to write (default: print it)")
    robustbench.set_defaults(func=_export_robustbench)
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
