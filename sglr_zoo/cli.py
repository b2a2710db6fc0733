"""The `sglr-zoo` command: train, eval, list, push, export, ... A user's mistake is one line and exit code 2."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from sglr_zoo.errors import UserError

_MULTI_PROCESS = "Multi-process: `accelerate launch train.py RECIPE ...`."  # train and finetune on several processes
_RERUN_RESUMES = "; rerun the same command to resume from the run's last checkpoint"
_RESUME = {  # what a rerun of the interrupted command does
    "train": _RERUN_RESUMES,
    "finetune": _RERUN_RESUMES,
    "eval": "; with --state-path FILE, a rerun with the same file resumes AutoAttack where it stopped",
}


def _train(args: argparse.Namespace) -> None:
    from sglr_zoo.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before importing the trainer: a bad recipe fails at once
    from sglr_zoo.training import train

    _trained(train(recipe, command=args.command))


def _finetune(args: argparse.Namespace) -> None:
    from sglr_zoo.finetune import finetune_recipe
    from sglr_zoo.training import train

    recipe = finetune_recipe(args.target, data=args.data, mode=args.mode, overrides=args.overrides)
    _trained(train(recipe, command=args.command))


def _trained(run: Path) -> None:
    from sglr_zoo.rundir import RunDir

    run_dir = RunDir(run)
    exports = ", ".join(str(run_dir.export(which)) for which in run_dir.exports())
    print(f"done: {run}; models: {exports} (evaluate one with `sglr-zoo eval FOLDER`, export it with "
          f"`sglr-zoo export {run} --out FOLDER`)")


def _import(args: argparse.Namespace) -> None:
    from sglr_zoo.models.convert import import_checkpoint, save_imported

    imported = import_checkpoint(args.file, args.arch, args.normalization)
    folder = save_imported(imported, args.out, source_name=Path(args.file).name)
    for key, values in imported.checkpoint_normalization.items():
        print(f"note: the checkpoint holds a normalisation buffer {key} = {values}; the model applies the stated "
              f"--normalization {args.normalization}")
    if imported.dropped:
        print(f"dropped {len(imported.dropped)} keys no forward pass uses: {', '.join(imported.dropped[:3])}"
              + (", ..." if len(imported.dropped) > 3 else ""))
    print(f"wrote {folder} ({imported.arch}, {imported.num_classes} classes); evaluate it with "
          f"`sglr-zoo eval {folder}`")


def _eval(args: argparse.Namespace) -> None:
    from sglr_zoo.evaluate import evaluate_model
    from sglr_zoo.files import write_atomic
    from sglr_zoo.outcomes import Outcomes
    from sglr_zoo.plots import eps_sweep_png
    from sglr_zoo.sharding import process_group

    out = Path(args.out)
    with process_group() as shards:  # several processes under torchrun or accelerate launch
        if shards.main:
            out.parent.mkdir(parents=True, exist_ok=True)
        results = evaluate_model(
            args.model, dataset=args.dataset, split=args.split, n=args.n, device=args.device, threat=args.threat,
            eps=args.eps, attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
            batch_size=args.batch_size, seed=args.seed, autoattack_version=args.autoattack_version,
            autoattack_attacks=args.autoattack_attacks.split(",") if args.autoattack_attacks else None,
            state_path=args.state_path, bf16_quick=args.bf16_quick, progress=True, command=args.command,
            weights=args.weights, outcomes_path=Outcomes.beside(out),
            eps_sweep=[r.strip() for r in args.eps_sweep.split(",") if r.strip()] if args.eps_sweep else (),
            sweep_attack=args.sweep_attack, shards=shards)
    if not shards.main:
        return
    print(results.summary())
    print(f"wrote {results.save(out)} and {Outcomes.beside(out)} (which images each attack broke)")
    if results.eps_sweep is not None:
        sweep = results.eps_sweep
        print(f"{sweep.attack} against eps: " + ", ".join(f"{e} {a:.2f}%" for e, a in zip(sweep.eps, sweep.accuracy))
              + f"; expected robustness {sweep.expected_robustness:.2f}%")
        plot = out.with_name(f"{out.stem}.eps_sweep.png")
        write_atomic(plot, eps_sweep_png(sweep, results.provenance.model or ""))
        print(f"wrote {plot}")


def _compare(args: argparse.Namespace) -> None:
    from sglr_zoo.outcomes import Outcomes, paired_test

    a, b = Outcomes.load(args.a), Outcomes.load(args.b)
    for attack in args.attacks.split(",") if args.attacks else [n for n in a.correct if n in b.correct]:
        print(paired_test(a, b, attack.strip()).describe())


def _list(args: argparse.Namespace) -> None:
    import timm

    from sglr_zoo.zoo import list_models

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def weights(row) -> str:
        where = " + ".join(where for where, present in (("bundled", row.bundled), ("Hub", row.published)) if present)
        return where or (f"superseded by {row.superseded_by}" if row.superseded_by else "no")

    listed = list_models()
    header = ("name", "arch", "dataset", "threat", "eps", "clean %", "AA %", "n", "weights")
    rows = [header] + [(r.name, r.arch, r.dataset, r.threat, r.eps, percent(r.clean), percent(r.autoattack),
                        str(r.n_examples or "-"), weights(r)) for r in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\naccuracies: the evaluator's results committed with each entry, on its first n test images (AA: "
          "AutoAttack).\nweights: 'bundled' load offline from this install, 'Hub' download (sha256-checked); "
          "for 'no', `sglr_zoo.load(NAME)` names the recipe that trains them; for 'superseded', where they are.")
    aliases = [f"  {alias} -> {r.name}" for r in listed for alias in r.aliases]
    if aliases:
        print("\naliases:\n" + "\n".join(aliases))
    print("\narchitectures (timm.create_model):")
    print("\n".join(f"  {name}" for name in timm.list_models("*_cifar")))


def _push(args: argparse.Namespace) -> None:
    from sglr_zoo.bundle import published_entry, push_zoo
    from sglr_zoo.push import push

    def announce(line: str) -> None:
        print(line, flush=True)  # before the upload starts

    options = dict(private=args.private, revision=args.revision, create_pr=args.create_pr, dry_run=args.dry_run,
                   announce=announce)
    if args.zoo:
        if args.run_or_folder or args.repo_id:
            raise UserError("--zoo ORG uploads the bundled zoo entries: give no RUN_OR_FOLDER or --repo-id with it")
        uploads = push_zoo(args.zoo, names=args.only, **options)
    elif not args.run_or_folder or not args.repo_id:
        raise UserError("give RUN_OR_FOLDER and --repo-id ORG/NAME, or --zoo ORG to upload the bundled zoo entries")
    elif args.only:
        raise UserError("--only picks zoo entries for --zoo ORG; drop it when pushing RUN_OR_FOLDER")
    else:
        uploads = [(None, args.repo_id, push(args.run_or_folder, args.repo_id, which=args.which,
                                             results=args.results, **options))]
    verb = "would upload" if args.dry_run else "uploaded"
    for name, repo_id, upload in uploads:
        where = repo_id + (f"@{args.revision}" if args.revision else "")
        print(f"{verb} {f'{name} ' if name else ''}{len(upload.files)} files to {where} "
              f"({'private' if upload.private else 'public'}):")
        for path, size in upload.files:
            print(f"  {size:>12,d}  {path}")
        print(f"model.safetensors sha256: {upload.sha256}" + (f", config.json sha256: {upload.config_sha256}"
                                                             if upload.config_sha256 else ""))
        print("dry run: nothing uploaded" if args.dry_run else f"done: {upload.url}")
    if args.zoo and not args.dry_run:
        print("\nfor sglr_zoo.load(NAME) to prefer these Hub copies, set in sglr_zoo/zoo.py:")
        for name, repo_id, upload in uploads:
            print(f"  {published_entry(name, repo_id, upload)}")


def _export(args: argparse.Namespace) -> None:
    from sglr_zoo.bundle import bundle
    from sglr_zoo.cards import rewrite_bundled_card, write_zoo_cards
    from sglr_zoo.export import export_folder

    if args.zoo_entry:
        if args.zoo_cards or args.repo_id:
            raise UserError("--zoo-entry writes the entry's folder and card for the repo its table entry names; "
                            "drop --zoo-cards and --repo-id")
        if not args.run_or_folder:
            print(f"wrote {rewrite_bundled_card(args.zoo_entry)}")
            return
        made = bundle(args.run_or_folder, args.zoo_entry, check_results=args.check_results, which=args.which,
                      results=args.results, half=args.fp16, out=args.out)
        print(f"wrote {made.folder}:")
        for path, size in made.files:
            print(f"  {size:>12,d}  {path}")
        print(made.table_entry())
        return
    if args.check_results:
        raise UserError("--check-results goes with --zoo-entry NAME")
    if args.zoo_cards:
        written = write_zoo_cards(args.runs_dir, args.out or "model_cards")
        print("\n".join(str(path) for path in written) or f"no zoo runs found under {args.runs_dir}/")
        return
    if not args.run_or_folder or not args.out:
        raise UserError("give RUN_OR_FOLDER and --out DIR (or --zoo-entry NAME, or --zoo-cards)")
    folder = export_folder(args.run_or_folder, args.out, which=args.which, results=args.results, repo_id=args.repo_id,
                           half=args.fp16)
    print("\n".join(str(path) for path in sorted(folder.iterdir())))


def _export_robustbench(args: argparse.Namespace) -> None:
    import json

    from sglr_zoo.export import export_robustbench

    entry = export_robustbench(args.run_or_folder, args.out, which=args.which, results=args.results)
    print(f"wrote {args.out}" if args.out else json.dumps(entry, indent=2))


def _one_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """A warning as one line, without the source line Python shows by default."""
    return f"{category.__name__}: {message}\n"


def _add_overrides(command: argparse.ArgumentParser, example: str) -> None:
    """The `key.sub=value` recipe overrides after a command's recipe or model; they win over the file."""
    command.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help=f"e.g. {example}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglr-zoo", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="adversarially train a model from a YAML recipe",
                                description="Train from a recipe; `key.sub=value` overrides win over the file. "
                                            + _MULTI_PROCESS)
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart_cifar10.yaml")
    _add_overrides(train, "schedule.epochs=10 run.seed=1")
    train.set_defaults(func=_train)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a pretrained (robust) backbone on new data",
        description="Fine-tune from a recipe with a finetune: section, or MODEL (a zoo name, hf-hub:ORG/NAME, "
                    "local-dir:PATH, a run directory or model folder, a timm name.tag) with --data and defaults. "
                    + _MULTI_PROCESS)
    finetune.add_argument("target", metavar="RECIPE_OR_MODEL", help="a YAML recipe, or the backbone to fine-tune")
    _add_overrides(finetune, "finetune.mode=linear_probe")
    finetune.add_argument("--data", help="image folder (a sub-folder per class), parquet folder, CSV of image paths "
                                         "or Hub dataset id (the same as data.dataset=...)")
    finetune.add_argument("--mode", choices=("linear_probe", "full", "partial", "lp_ft"),
                          help="how the backbone is adapted (the same as finetune.mode=...; default full; lp_ft: a "
                               "linear probe for finetune.probe_share of the run, then full)")
    finetune.set_defaults(func=_finetune)

    importer = commands.add_parser(
        "import", help="import a foreign CIFAR checkpoint into one of our architectures",
        description="Read a .safetensors file or a torch.save file (with weights_only=True: code in pickles is "
                    "refused), rename its layout (the SGLR authors' code, pytorch-cifar, TRADES, RobustBench), load "
                    "it strictly and write a model folder that every command accepts.")
    importer.add_argument("file", metavar="FILE", help="the checkpoint (.safetensors, .pt, .pth, .tar, .bin, .ckpt)")
    importer.add_argument("--arch", required=True, help="our architecture, e.g. wrn34_10_cifar, preactresnet18_cifar, "
                                                        "resnet18_cifar (see `sglr-zoo list`)")
    importer.add_argument("--normalization", required=True, metavar="none|cifar10|cifar100|MEAN,STD",
                          help="what the model's own code applies to [0, 1] inputs; the weights do not say")
    importer.add_argument("--out", required=True, metavar="FOLDER", help="the new model folder")
    importer.set_defaults(func=_import)

    ev = commands.add_parser("eval", help="clean and robust accuracy (PGD, CW, AutoAttack) with sanity checks",
                             description="Evaluate on the first N examples of a split, in order, and write one "
                                         "results JSON (the only source of the numbers on model cards). Sharded "
                                         "over N processes (the same results): `accelerate launch --multi_gpu "
                                         "--num_processes N -m sglr_zoo eval ...`.")
    ev.add_argument("model", help="a zoo name, model folder, run directory, local-dir:PATH, hf-hub:ORG/NAME, "
                                  "or a timm architecture with --weights")
    ev.add_argument("--weights", metavar="FILE.safetensors", help="a state dict for the architecture named as MODEL")
    ev.add_argument("--dataset", default="uoft-cs/cifar10",
                    help="Hub id or local folder (SGLR_ZOO_DATA is honoured; default %(default)s)")
    ev.add_argument("--split", default="test", help="default %(default)s")
    ev.add_argument("--threat", choices=["linf", "l2"], default="linf")
    ev.add_argument("--eps", default=None, help="e.g. 8/255 (the linf default) or 0.5 (the l2 default)")
    ev.add_argument("--attacks", default="clean,pgd20,cw20,autoattack",
                    help="comma-separated: clean, pgd<steps>, cw<steps>, autoattack (default %(default)s; "
                         "AutoAttack is the slow one: on a CPU, try --n 100 first)")
    ev.add_argument("--n", type=int, default=1000, help="number of examples, the first n of the split "
                                                        "(default %(default)s)")
    ev.add_argument("--batch-size", type=int, default=256, help="default %(default)s")
    ev.add_argument("--out", default="results.json", help="where to write the results JSON (default %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="default %(default)s")
    ev.add_argument("--autoattack-version", choices=["standard", "rand", "custom"], default="standard")
    ev.add_argument("--autoattack-attacks", default=None, metavar="apgd-ce,...",
                    help="sub-attacks for --autoattack-version custom: apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square")
    ev.add_argument("--state-path", default=None, metavar="FILE",
                    help="AutoAttack progress file; rerun with the same file to resume a killed run")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--bf16-quick", action="store_true", help="bf16 autocast for our PGD/CW only (never AutoAttack)")
    ev.add_argument("--eps-sweep", default=None, metavar="2/255,4/255,...",
                    help="also run --sweep-attack at each radius: accuracy against eps, its area, a plot beside --out")
    ev.add_argument("--sweep-attack", default="pgd20", help="pgd<steps>, cw<steps> or autoattack (default %(default)s)")
    ev.set_defaults(func=_eval)

    compare = commands.add_parser("compare", help="paired test of two evaluations on the same images (McNemar)",
                                  description="Compares the per-example outcomes that `sglr-zoo eval --out X.json` "
                                              "writes as X.outcomes.json.")
    compare.add_argument("a", metavar="A.outcomes.json")
    compare.add_argument("b", metavar="B.outcomes.json")
    compare.add_argument("--attacks", default=None, help="e.g. pgd20,autoattack (default: every attack both ran)")
    compare.set_defaults(func=_compare)

    listing = commands.add_parser("list", help="list the architectures and zoo models",
                                  description="The zoo's models with their clean and AutoAttack accuracy and where "
                                              "their weights are, then our CIFAR architectures.")
    listing.set_defaults(func=_list)

    def checkpoint_args(sub: argparse.ArgumentParser, optional: bool = False) -> None:
        sub.add_argument("run_or_folder", metavar="RUN_OR_FOLDER", nargs="?" if optional else None,
                         help="a run directory (runs/NAME) or a model folder")
        sub.add_argument("--which", choices=("best", "last"),
                         help="which export of a run (default: best/ where the run has one, else last/)")
        sub.add_argument("--results", help="the evaluator's results JSON (default: the results.json beside the "
                                           "weights)")

    push = commands.add_parser("push", help="upload a run's model, or the bundled zoo entries, to the Hugging Face Hub",
                               description="Export weights, config, model card, recipe and results and upload them "
                                           "with huggingface_hub (token from HF_TOKEN or `hf auth login`); with "
                                           "--zoo ORG, upload every bundled zoo entry to ORG/<arch>.<tag>.")
    checkpoint_args(push, optional=True)
    push.add_argument("--repo-id", help="ORG/NAME, e.g. sglr-zoo/wrn34_10_cifar.sglr_linf8_c10")
    push.add_argument("--zoo", metavar="ORG", help="upload the bundled zoo entries (sglr_zoo/bundled/) to ORG, "
                                                   "e.g. sglr-zoo, instead of RUN_OR_FOLDER")
    push.add_argument("--only", nargs="+", metavar="NAME", help="with --zoo: only these entries")
    push.add_argument("--private", action="store_true",
                      help="create the repo private (without it a new repo is public; an existing public repo is "
                           "refused)")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload nothing")
    push.set_defaults(func=_push)

    export = commands.add_parser("export", help="write a Hub-ready model folder (weights, config, model card, ...)",
                                 description="Write a folder loadable with `timm.create_model('local-dir:OUT')`; "
                                             "with --zoo-cards, write model_cards/<name>.md for zoo runs that exist.")
    checkpoint_args(export, optional=True)
    export.add_argument("--out", help="the new folder (with --zoo-entry: default sglr_zoo/bundled/<bundle>; with "
                                      "--zoo-cards: the cards folder, default model_cards)")
    export.add_argument("--repo-id", help="the Hub repo the card should point to")
    export.add_argument("--zoo-entry", metavar="NAME",
                        help="bundle the run as zoo entry NAME (in the table of sglr_zoo/zoo.py): write "
                             "sglr_zoo/bundled/<bundle>/ (or --out) and print the sha256 line for the table; "
                             "without a run, render the bundled entry's card again")
    export.add_argument("--check-results", metavar="FILE",
                        help="with --zoo-entry: the evaluator's clean + PGD-20 results on the first 200 test images "
                             "(`sglr-zoo eval RUN/best --n 200 --attacks clean,pgd20 --out FILE`)")
    export.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    export.add_argument("--zoo-cards", action="store_true", help="write cards for every zoo entry whose run exists")
    export.add_argument("--runs-dir", default="runs", help="where the zoo runs are (with --zoo-cards)")
    export.set_defaults(func=_export)

    robustbench = commands.add_parser("export-robustbench", help="write a RobustBench model_info JSON",
                                      description="Numbers come from the results JSON; AutoAttack must have been run.")
    checkpoint_args(robustbench)
    robustbench.add_argument("--out", help="the JSON file to write (default: print it)")
    robustbench.set_defaults(func=_export_robustbench)
    for command in commands.choices.values():
        command.set_defaults(parser=command)  # a usage error shows the command's own usage
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options: `finetune MODEL --data DIR key=value` leaves the overrides over.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.command = shlex.join(["sglr-zoo", *argv])
    python_format, warnings.formatwarning = warnings.formatwarning, _one_line
    try:
        args.func(args)
    except UserError as error:
        print(f"sglr-zoo {args.name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nsglr-zoo {args.name}: interrupted{_RESUME.get(args.name, '')}", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = python_format


if __name__ == "__main__":
    main()
