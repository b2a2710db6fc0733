"""Loading models by name: zoo aliases, `hf-hub:` / `local-dir:` ids, model folders and run directories.

The zoo is one table, `ZOO`, mapping short names (`wrn34-sglr`, and their `aliases`) to the Hub repo that holds
the weights (named the timm way, `arch.tag`) and the recipe that trains them. An entry's weights exist when they
are bundled (an exported folder committed under `sglr_zoo/bundled/<bundle>/`, shipped as package data so that
editable installs and wheels both have it) or published (`published=True`: on the Hub at `repo_id`); either way
the table pins the sha256 of `model.safetensors` and of `config.json` (which says how the weights are built and
what normalises the inputs: an edited one would load other, wrong, models from the same weights). No number is
typed here: clean and AutoAttack accuracy come from the evaluator's results JSON, the bundle's `results.json` (else
`model_cards/<name>.results.json`).

    sglr_zoo/bundled/<bundle>/   written by `sglr-zoo export RUN --zoo-entry NAME`, uploaded by `sglr-zoo push --zoo`
      model.safetensors, config.json   the weights (float16 when exported with --fp16) in timm's layout
      README.md                        the model card, rendered from results.json
      results.json                     the evaluator's results (AutoAttack included)
      check_results.json               the evaluator's clean + PGD-20 on the first n test images (a reproduction check)
      recipe.yaml, run.json, metrics.csv, curves.png   the run's records
"""

from __future__ import annotations

import difflib
import hashlib
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.files import TEXT_LIMIT, read_regular
from sglr_zoo.models import (
    WEIGHTS_LIMIT,
    check_weights_file,
    create_model,
    load_pretrained,
    register_locator,
    sha256_of,
)
from sglr_zoo.results import Results
from sglr_zoo.rundir import ModelFolder, RunDir

__all__ = ["ZOO", "HubUnavailable", "ZooEntry", "ZooRow", "bundle_folder", "check_repo_id", "download",
           "list_models", "load", "lookup", "resolve_folder"]

HUB_ORG = "sglr-zoo"
WEIGHTS_NAME, CONFIG_NAME = ModelFolder(".").weights.name, ModelFolder(".").config.name  # a Hub repo's layout
RESULTS_NAME = ModelFolder(".").results.name  # our evaluator's results, in the repos `sglr-zoo push` uploads
PICKLE_NAMES = ("pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")
MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"
BUNDLED = Path(__file__).resolve().parent / "bundled"  # package data: found by editable installs and wheels alike
CHECK_RESULTS = "check_results.json"  # in a bundle: the evaluator's clean + PGD-20 on the first n test images
METHOD_TAGS = {"sglr": "sglr", "pgd_at": "pgdat", "trades": "trades", "sglr_trades": "sglrtrades"}


class HubUnavailable(UserError):
    """The Hub cannot be reached (or offline mode is on) and the files are not in the local cache."""


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo: where its weights live (bundled, on the Hub, or not yet) and how they were trained."""

    name: str
    arch: str
    repo_id: str  # Hub repo named the timm way, ORG/arch.tag (tag: method, threat and eps, dataset)
    method: str  # recipe method.name
    recipe: str  # path of the recipe that trains it, relative to the repository root
    dataset: str = "cifar10"
    threat: str = "linf"
    eps: str = "8/255"
    published: bool = False  # True once the weights are on the Hub at `repo_id`
    revision: str | None = None  # pin a commit once published
    sha256: str | None = None  # of model.safetensors: checked on download, and on every load of the bundled copy
    config_sha256: str | None = None  # of config.json, checked alike
    bundle: str | None = None  # the folder under sglr_zoo/bundled/ holding the committed export, if bundled
    aliases: tuple[str, ...] = ()  # other names `load` accepts for this entry
    superseded_by: str | None = None  # a bundled entry of the same architecture with more AutoAttack accuracy: this
    last_bundled: str | None = None  # one's weights left the bundle after this commit, whose tree still holds them
    twin: str | None = None  # the entry trained from the same preset, seed and steps by the other method (SGLR or
    # its PGD-AT baseline): the two cards compare them on the same images

    @property
    def folder(self) -> Path | None:
        """The bundled export folder (`sglr_zoo/bundled/<bundle>`), or None when the entry is not bundled."""
        return BUNDLED / self.bundle if self.bundle else None

    def record(self, name: str) -> Path:
        """Where one of the entry's committed records (`results.json`, `run.json`, ...) is: in its bundle, else
        `model_cards/<entry name>.<name>` (where a retired entry's records stay)."""
        return self.folder / name if self.folder else MODEL_CARDS / f"{self.name}.{name}"

    @property
    def results_path(self) -> Path:
        """Where the evaluator's results for these weights are committed: the bundle's, else model_cards/."""
        return self.record(RESULTS_NAME)

    @property
    def results(self) -> Results | None:
        """The evaluator's results for the entry's weights, if committed."""
        return Results.load(self.results_path) if self.results_path.is_file() else None


def _entry(name: str, arch: str, method: str, recipe: str, *, scale: str = "", **fields) -> ZooEntry:
    """An entry published as `sglr-zoo/arch.tag`, the tag naming method, threat, eps, dataset (and a reduced
    `scale` such as "cpu": not the paper's schedule); `fields` are ZooEntry's other fields (bundle, sha256, ...)."""
    tag = "_".join(filter(None, [METHOD_TAGS[method], "linf8", "c10", scale]))
    return ZooEntry(name=name, arch=arch, repo_id=f"{HUB_ORG}/{arch}.{tag}", method=method, recipe=recipe, **fields)


# Where the cpu1k entries went (ZooEntry.superseded_by) and the last commit that bundles them.
RETIRED = dict(superseded_by="prn10s-c10-sglr-cpu30m", last_bundled="90c6aa3daa8f")

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    _entry("wrn34-sglr", "wrn34_10_cifar", "sglr", "recipes/wrn34_cifar10.yaml"),
    _entry("wrn34-pgdat", "wrn34_10_cifar", "pgd_at", "recipes/wrn34_cifar10_pgdat.yaml"),
    _entry("wrn34-trades", "wrn34_10_cifar", "trades", "recipes/wrn34_cifar10_trades.yaml"),
    _entry("prn18-sglr", "preactresnet18_cifar", "sglr", "recipes/prn18_cifar10.yaml"),
    _entry("prn18-pgdat", "preactresnet18_cifar", "pgd_at", "recipes/prn18_cifar10_pgdat.yaml"),
    _entry("prn18-trades", "preactresnet18_cifar", "trades", "recipes/prn18_cifar10_trades.yaml"),
    _entry("resnet18-sglr", "resnet18_cifar", "sglr", "recipes/resnet18_cifar10.yaml"),
    _entry("resnet18-pgdat", "resnet18_cifar", "pgd_at", "recipes/resnet18_cifar10_pgdat.yaml"),
    _entry("resnet18-trades", "resnet18_cifar", "trades", "recipes/resnet18_cifar10_trades.yaml"),
    # CPU scale, bundled (sglr_zoo/bundled/): the quickstart's model of 2026-11-28 (FGSM-RS, as its bundled recipe.yaml
    # says; the quickstart trains with N-FGSM since 2026-12-05, and lets its budget pick the width since 2026-12-05),
    # trained in 8 min 46 s on 2 CPU cores.
    _entry("prn10q-c10-sglr-cpu", "preactresnet10_quarter_cifar", "sglr", "recipes/quickstart_cifar10.yaml",
           scale="cpu", bundle="prn10q-c10-sglr-cpu",
           sha256="e2418a96687b79226899aa3c783f019588c93e1ec5913a3df395807813967ac0",
           config_sha256="ed8b6b7dcd8f1c875cb4b059f78c34be3ffade15356d95e1cfa9d5e635b583b7",
           aliases=("quickstart-sglr",)),
    # CPU scale, bundled: the quickstart's recipe with a 30-minute budget, which is the time-to-robustness
    # benchmark's `sglr-nfgsm-slim-aug-ema998` preset (N-FGSM, crops and flips, weight averaging 0.998), seed 1,
    # trained in 29.6 min on 2 CPU cores (AMD EPYC Zen 4, bf16): docs/time_to_robustness.md, "Thirty minutes".
    _entry("prn10s-c10-sglr-cpu30m", "preactresnet10_slim_cifar", "sglr", "recipes/quickstart_cifar10.yaml",
           scale="cpu30m", bundle="prn10s-c10-sglr-cpu30m",
           sha256="1e3bb94e6bbcfecab99a8f9d7b9d3493efc87f09f49896b3bdece49691c98a7a",
           config_sha256="ae9195c17a5f48885ceaf4da8f97177aac4ae9434aa3874241f03b30876fc761"),
    # The paper's PreActResNet-18, bundled: prn18-c10-sglr-cpu2h trained two hours more with the same preset
    # (recipes/prn18_cifar10_cpu4h.yaml: a warm restart, crops and weight averaging on, seed 1): 15.1 epochs and
    # 3 h 33 min on 2 CPU cores (AMD EPYC Zen 4, bf16) in two stages: docs/zoo.md, "A second two-hour stage".
    _entry("prn18-c10-sglr-cpu4h", "preactresnet18_cifar", "sglr", "recipes/prn18_cifar10_cpu4h.yaml",
           scale="cpu4h", bundle="prn18-c10-sglr-cpu4h",
           sha256="138ac2478f6ab8bf54e0f2a31ac271383228ff4e4de9cfb9f32f340a1a246673",
           config_sha256="5dd530eb8afb22c85e809a975ef4d12d255765d3e0a87504c4d2132b7ef45a90"),
    # Its first stage: recipes/prn18_cifar10_cpu.yaml (the quickstart's preset: N-FGSM; crops and weight averaging
    # only from 10 planned epochs, so neither at its 8), two hours on 2 CPU cores (AMD EPYC Zen 4, bf16), 7.9 epochs
    # on 49,000 CIFAR-10 images. Its weights left the bundle on 2026-12-08 for its second stage.
    _entry("prn18-c10-sglr-cpu2h", "preactresnet18_cifar", "sglr", "recipes/prn18_cifar10_cpu.yaml",
           scale="cpu2h", superseded_by="prn18-c10-sglr-cpu4h", last_bundled="0923d9902a9b",
           sha256="3d1fe8a1f3a8476b6b6731b339d6641f6f32ce5ed12d51dc828d5b7c538975c5",
           config_sha256="29c10220f23e6d39de377fe4e36095dbdacc473a951a1ae89b87b4ea6468bcad"),
    # The paper's PreActResNet-18, short scale: 16 epochs (210 s on one H100) on 24,000 CIFAR-10 images. Its weights
    # left the bundle on 2026-12-07 for prn18-c10-sglr-cpu2h (same architecture, more AutoAttack), which
    # prn18-c10-sglr-cpu4h superseded in turn.
    _entry("prn18-c10-sglr-short", "preactresnet18_cifar", "sglr", "recipes/prn18_cifar10.yaml",
           scale="short", superseded_by="prn18-c10-sglr-cpu4h", last_bundled="27f0934d7faf",
           sha256="1c94344a25a6d375205d4b3fc1edeb365557f22e158d9c1e6745954c4f29d234",
           config_sha256="2715fe440201f39641b994a97e2e182d865a2ff6631b55bae4d9557f7a3aa9a4"),
    # CPU scale, 1,000 training images: the final models (seed 0) of the robust-overfitting experiment
    # (docs/overfitting.md), 80 epochs of PGD-3 training with step decay, about 30 min each on one CPU core. Their
    # weights left the bundle on 2026-12-06 for prn10s-c10-sglr-cpu30m (same architecture, more AutoAttack); their
    # results stay in model_cards/.
    _entry("prn10s-c10-pgdat-cpu1k", "preactresnet10_slim_cifar", "pgd_at", "experiments/overfitting/pgd_at.yaml",
           scale="cpu1k", **RETIRED,
           sha256="ec0e3f756d15d9606be6a6d2aab19455c7f866b109f2416d2d2e181f39b08610",
           config_sha256="47a024313ced69b87bb9e0c82de75523e296fb7cd04053c0ce17d35210563f03"),
    _entry("prn10s-c10-sglr-cpu1k", "preactresnet10_slim_cifar", "sglr", "experiments/overfitting/sglr.yaml",
           scale="cpu1k", **RETIRED,
           sha256="d67513342f85f2adae48fd7fd4603e113ec861adf54b169136ace5ffabf5d83c",
           config_sha256="47a024313ced69b87bb9e0c82de75523e296fb7cd04053c0ce17d35210563f03"),
    _entry("prn10s-c10-trades-cpu1k", "preactresnet10_slim_cifar", "trades", "experiments/overfitting/trades.yaml",
           scale="cpu1k", **RETIRED,
           sha256="2a8f223bd6c60792f775b9a8150b8914d9d7d4eaa1437d9ef7c89e13018fcb59",
           config_sha256="47a024313ced69b87bb9e0c82de75523e296fb7cd04053c0ce17d35210563f03"),
    _entry("prn10s-c10-sglrtrades-cpu1k", "preactresnet10_slim_cifar", "sglr_trades",
           "experiments/overfitting/sglr_trades.yaml", scale="cpu1k", **RETIRED,
           sha256="9e661d4c6f32d2562db6a419e55e79e2c5575bb2887dfa6d1a886e53da8551f9",
           config_sha256="47a024313ced69b87bb9e0c82de75523e296fb7cd04053c0ce17d35210563f03"),
]}


class ZooRow(NamedTuple):
    """One line of `sglr-zoo list`; accuracies (percent) come from the committed results JSON, else None."""

    name: str
    arch: str
    dataset: str
    threat: str
    eps: str
    clean: float | None
    autoattack: float | None
    n_examples: int | None  # of the results the accuracies come from
    bundled: bool  # weights committed in the repository (sglr_zoo/bundled/)
    published: bool  # weights on the Hub
    aliases: tuple[str, ...] = ()
    superseded_by: str | None = None  # the entry that replaced this one's weights

    @property
    def weights(self) -> bool:
        """True when `sglr_zoo.load(name)` has weights to load."""
        return self.bundled or self.published


def list_models() -> list[ZooRow]:
    """The zoo table, one row per entry."""
    rows = []
    for entry in ZOO.values():
        results = entry.results
        rows.append(ZooRow(entry.name, entry.arch, entry.dataset, entry.threat, entry.eps,
                           results.clean_accuracy if results else None,
                           results.robust_accuracy.get("autoattack") if results else None,
                           results.n_examples if results else None, entry.bundle is not None, entry.published,
                           entry.aliases, entry.superseded_by))
    return rows


def lookup(name: str) -> ZooEntry | None:
    """The zoo entry called `name` or having it as an alias, else None."""
    if name in ZOO:
        return ZOO[name]
    return next((entry for entry in ZOO.values() if name in entry.aliases), None)


def resolve_folder(path: Path) -> Path:
    """A model folder (config.json + model.safetensors), or a run directory's `best/` (else `last/`) export."""
    if ModelFolder(path).config.exists():  # not only a regular file: what else it is, loading says
        return path
    run = RunDir(path)
    if run.exports():
        return run.export(run.exports()[0])
    raise UserError(f"{path} holds no model: expected config.json + model.safetensors, or a run directory "
                    "with best/ or last/ exports (written by `sglr-zoo train`)")


def locate(name_or_id: str) -> str:
    """The `local-dir:FOLDER` holding a model's weights: downloads and checks Hub weights, resolves run dirs.

    Accepts a zoo name or alias (`sglr-zoo list`), `hf-hub:ORG/NAME[@rev]`, `local-dir:PATH`, or a plain path to
    a model folder or run directory. Hub weights must be safetensors and are checked against their sha256.
    """
    if (entry := lookup(name_or_id)) is not None:
        return f"local-dir:{_entry_folder(entry)}"
    if name_or_id.startswith("hf-hub:"):
        repo_id, _, revision = name_or_id.removeprefix("hf-hub:").partition("@")
        check_repo_id(repo_id, revision or None, name_or_id)
        return f"local-dir:{download(repo_id, revision or None)}"
    if name_or_id.startswith("local-dir:"):
        return name_or_id
    if Path(name_or_id).exists():
        return f"local-dir:{resolve_folder(Path(name_or_id))}"
    if timm.is_model(name_or_id):
        raise UserError(f"{name_or_id!r} is an architecture without weights: give them as a .safetensors state dict "
                        "(`--weights FILE`, or `weights=` in Python), or name a zoo model, model folder or Hub repo. "
                        "See `sglr-zoo list`")
    names = [*ZOO, *(alias for entry in ZOO.values() for alias in entry.aliases)]
    close = difflib.get_close_matches(name_or_id, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    if (run := RunDir(Path(name_or_id).parent)).exports():
        hint = f"; the run {run.root} has {' and '.join(f'{which}/' for which in run.exports())}"
    elif not close and name_or_id.count("/") == 1:
        hint = f"; for a Hub repo write 'hf-hub:{name_or_id}'"
    raise UserError(f"cannot load {name_or_id!r}: not a zoo name (`sglr-zoo list`), an existing path, "
                    f"'hf-hub:ORG/NAME' or 'local-dir:PATH'{hint}")


register_locator(locate)  # create_model(pretrained=...) and load_pretrained resolve names through the zoo


def load(name_or_id: str, *, weights: str | Path | None = None, num_classes: int | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """Returns an eval-mode model taking [0, 1] images, from anything `locate` accepts, or from a timm
    architecture name plus a `.safetensors` state dict (`weights`, with `num_classes`)."""
    if weights is not None:
        model = create_model(name_or_id, num_classes or 10, pretrained=check_weights_file(weights)).eval()
    else:
        model = load_pretrained(locate(name_or_id))
    return model.to(device) if device is not None else model


def _entry_folder(entry: ZooEntry) -> Path:
    """A zoo entry's checked weights folder: the Hub copy when published and its sha256 is the table's, else the
    bundled copy (silently when the Hub is unreachable or offline, with a warning when the Hub copy differs)."""
    if entry.published:
        try:
            return download(entry.repo_id, entry.revision, sha256=entry.sha256, config_sha256=entry.config_sha256)
        except HubUnavailable:
            if entry.bundle is None:
                raise
        except UserError as error:
            if entry.bundle is None:
                raise
            warnings.warn(f"{entry.name}: not using the Hub copy ({error}); loading the bundled copy in "
                          f"{entry.folder} instead", stacklevel=2)
    if entry.bundle is not None:
        return bundle_folder(entry)
    if entry.superseded_by is not None:
        raise UserError(superseded_message(entry))
    raise UserError(f"{entry.name}: weights not published yet ({entry.repo_id} has not been uploaded). "
                    f"Train them with `sglr-zoo train {entry.recipe}` and load the run directory, "
                    f"e.g. sglr_zoo.load('runs/{Path(entry.recipe).stem}')")


def superseded_message(entry: ZooEntry) -> str:
    """Why a superseded entry loads nothing, what to load instead, and where its weights still are."""
    successor = ZOO[entry.superseded_by]

    def autoattack(of: ZooEntry) -> str:
        results = of.results
        return f"{results.robust_accuracy['autoattack']:.1f} %" if results else "not recorded"

    return (f"{entry.name}: its weights left the bundle, superseded by {successor.name} (the same architecture; "
            f"AutoAttack {autoattack(successor)} against {autoattack(entry)}): load that one. These weights "
            f"(sha256 {entry.sha256}) are in the repository's history: `git archive {entry.last_bundled} "
            f"sglr_zoo/bundled/{entry.name} | tar -x`, then load the folder by its path; or retrain them with "
            f"`sglr-zoo train {entry.recipe}`")


def bundle_folder(entry: ZooEntry) -> Path:
    """The bundled export folder of `entry`, after checking its weights and config.json against the table's
    sha256s."""
    folder = ModelFolder(entry.folder)
    if not folder.is_model():
        raise UserError(f"{entry.name}: the bundled folder {folder.root} lacks {CONFIG_NAME} or {WEIGHTS_NAME}: "
                        "restore it from the repository (the wheel ships it as package data: reinstall sglr-zoo)")
    for path, field, what in ((folder.weights, "sha256", "weights"), (folder.config, "config_sha256", "config")):
        expected = getattr(entry, field)
        if expected is None:
            raise UserError(f"{entry.name}: the zoo table gives no {field} for {path}; add the one "
                            f"`sglr-zoo export RUN --zoo-entry {entry.name}` printed to sglr_zoo/zoo.py")
        digest = sha256_of(path)
        if digest != expected.lower():
            raise UserError(f"{entry.name}: {path} has sha256 {digest}, the zoo table expects {expected}: the "
                            f"bundled {what} file differs from the zoo's record (changed or corrupt). Restore it from "
                            f"the repository, or if you re-exported it on purpose, put the new {field} in "
                            "sglr_zoo/zoo.py")
    return folder.root


def check_repo_id(repo_id: str, revision: str | None = None, given: str | None = None) -> None:
    """A UserError naming what was given unless `repo_id` is a Hub repo id (ORG/NAME, huggingface_hub's rules) and
    `revision` a plain branch, tag or commit name: both end up in URLs and in paths of the local cache."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    where = given or f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"{where}: {repo_id!r} is not a Hub repo id ({str(error).split(':')[0]}); write "
                        "'hf-hub:ORG/NAME' or 'hf-hub:ORG/NAME@REVISION'") from None
    if revision is not None and (not re.fullmatch(r"[\w./-]{1,255}", revision) or revision.endswith(".lock")
                                 or any(part in ("", ".", "..") for part in revision.split("/"))):
        raise UserError(f"{where}: {revision!r} is not a branch, tag or commit name (letters, digits, '_', '-', '.' "
                        "and '/', no '..')")


def download(repo_id: str, revision: str | None = None, *, sha256: str | None = None,
             config_sha256: str | None = None) -> Path:
    """Fetches config.json + model.safetensors of a Hub repo into the HF cache, and results.json where the repo
    has one (the backbone's own accuracy for a fine-tuning: `finetune.backbone_record`); returns their folder.

    Refuses repos holding only pickle weights. Every file is hashed and compared with the Hub's record of the
    file (the LFS sha256, or the git blob id of a small file), and the weights and config with `sha256` and
    `config_sha256` when given.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    check_repo_id(repo_id, revision)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    remote = None
    if not constants.HF_HUB_OFFLINE:
        try:
            infos = HfApi().get_paths_info(repo_id, [WEIGHTS_NAME, CONFIG_NAME, RESULTS_NAME, *PICKLE_NAMES],
                                           revision=revision)
            remote = {info.path: info for info in infos}
        except GatedRepoError:
            raise UserError(f"{where} is gated: accept its terms on the Hub and log in (`hf auth login` or "
                            "HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise UserError(f"Hub repo {repo_id} not found at {constants.ENDPOINT} (or it is private: log in with "
                            "`hf auth login` or set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise UserError(f"{repo_id} has no revision {revision!r}") from None
        except HfHubHTTPError as error:
            raise UserError(f"Hub request for {where} failed: {error}") from None
        except network_errors():
            remote = None  # unreachable: fall back to the local cache below
    if remote is not None:
        if WEIGHTS_NAME not in remote:
            pickles = sorted(set(remote) & set(PICKLE_NAMES))
            what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
            raise UserError(f"{where} has {what}; sglr_zoo loads {WEIGHTS_NAME} only (pickle files can run code). "
                            "Re-export with `sglr_zoo.models.save_pretrained` or `sglr-zoo push`")
        if CONFIG_NAME not in remote:
            raise UserError(f"{where} has no {CONFIG_NAME}: not a timm model repo (see `sglr-zoo push`)")
    try:
        names = (CONFIG_NAME, WEIGHTS_NAME, *([RESULTS_NAME] if remote and RESULTS_NAME in remote else []))
        files = [hf_hub_download(repo_id, name, revision=revision, local_files_only=remote is None) for name in names]
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        if remote is None:  # not in the cache, and the Hub was not reachable
            raise HubUnavailable(f"cannot download {where}: the Hub ({constants.ENDPOINT}) is unreachable or offline "
                            f"mode is on (HF_HUB_OFFLINE), and the files are not in the local cache "
                            f"({constants.HF_HUB_CACHE}). Connect once, or copy the model folder and load it "
                            "with 'local-dir:PATH'") from None
        raise UserError(f"cannot download {where}: {error}") from None
    except HfHubHTTPError as error:
        raise UserError(f"cannot download {where}: {error}") from None
    except network_errors() as error:
        raise HubUnavailable(f"cannot download {where}: the Hub ({constants.ENDPOINT}) is unreachable "
                             f"({error})") from None
    if remote is None:  # offline: the results of the cached revision, where they were fetched
        cached = try_to_load_from_cache(repo_id, RESULTS_NAME, revision=revision)
        files += [cached] if isinstance(cached, str) else []
    config, weights, *results = map(Path, files)
    for path, pinned, limit in ((weights, sha256, WEIGHTS_LIMIT), (config, config_sha256, TEXT_LIMIT),
                                *((path, None, TEXT_LIMIT) for path in results)):
        data = read_regular(path, limit, path.name)
        digest = hashlib.sha256(data).hexdigest()
        if pinned is not None and digest != pinned.lower():
            raise UserError(f"{where}: {path.name} has sha256 {digest}, the zoo table expects {pinned}; the Hub "
                            f"files changed or the download is corrupt. Delete {weights.parent} and retry")
        info = remote.get(path.name) if remote else None
        if info is not None:
            expected, got = (info.lfs.sha256, digest) if info.lfs else (info.blob_id, _git_blob_id(data))
            if expected and got != expected:
                raise UserError(f"{where}: downloaded {path.name} does not match the Hub's record ({got} != "
                                f"{expected}); delete {weights.parent} and retry")
    if any(path.parent != weights.parent for path in (config, *results)):
        raise UserError(f"{where}: {', '.join(path.name for path in (config, weights, *results))} came from different "
                        "revisions; retry")
    return weights.parent


def _git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub lists for files not stored in LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures: OSError covers huggingface_hub's offline errors; plus the HTTP client's own."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx", "requests"):
        module = sys.modules.get(client)
        error = getattr(module, "RequestError", None) or getattr(module, "RequestException", None)
        if isinstance(error, type):
            errors.append(error)
    return tuple(errors)
