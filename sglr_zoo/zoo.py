"""Loading models by name: zoo aliases, `hf-hub:` / `local-dir:` ids, model folders and run directories.

The zoo is one table, `ZOO`, mapping short names (`wrn34-sglr`) to the Hub repo that holds the weights
(named the timm way, `arch.tag`) and the recipe that trains them. Nothing is published until an entry says
`published=True`; no number is typed here: clean and AutoAttack accuracy come from the evaluator's results
JSON committed as `model_cards/<name>.results.json`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from sglr_zoo.errors import UserError
from sglr_zoo.models import load_pretrained, load_weights

__all__ = ["ZOO", "ZooEntry", "ZooRow", "download", "list_models", "load", "resolve_folder"]

HUB_ORG = "sglr-zoo"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")
MODEL_CARDS = Path(__file__).resolve().parents[1] / "model_cards"


@dataclass(frozen=True)
class ZooEntry:
    """One published (or to-be-published) model: where its weights live and how they were trained."""

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
    sha256: str | None = None  # of model.safetensors, checked on download when set

    @cached_property
    def results(self) -> dict[str, Any] | None:
        """The evaluator's results for the published weights (`model_cards/<name>.results.json`), if committed."""
        path = MODEL_CARDS / f"{self.name}.results.json"
        return json.loads(path.read_text()) if path.is_file() else None


def _entry(name: str, arch: str, method: str, recipe: str) -> ZooEntry:
    tag = {"sglr": "sglr", "pgd_at": "pgdat", "trades": "trades"}[method] + "_linf8_c10"
    return ZooEntry(name=name, arch=arch, repo_id=f"{HUB_ORG}/{arch}.{tag}", method=method, recipe=recipe)


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
    _entry("quickstart-sglr", "preactresnet10_slim_cifar", "sglr", "recipes/quickstart_cifar10.yaml"),
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
    weights: bool


def list_models() -> list[ZooRow]:
    """The zoo table, one row per short name."""
    rows = []
    for entry in ZOO.values():
        results = entry.results or {}
        rows.append(ZooRow(entry.name, entry.arch, entry.dataset, entry.threat, entry.eps,
                           results.get("clean_accuracy"), (results.get("robust_accuracy") or {}).get("autoattack"),
                           entry.published))
    return rows


def resolve_folder(path: Path) -> Path:
    """A model folder (config.json + model.safetensors), or a run directory's `best/` (else `last/`) export."""
    if (path / "config.json").is_file():
        return path
    for export in ("best", "last"):
        if (path / export / "config.json").is_file():
            return path / export
    raise UserError(f"{path} holds no model: expected config.json + model.safetensors, or a run directory "
                    "with best/ or last/ exports (written by `sglr-zoo train`)")


def locate(name_or_id: str) -> str:
    """The `local-dir:FOLDER` holding a model's weights: downloads and checks Hub weights, resolves run dirs.

    Accepts a zoo name (`sglr-zoo list`), `hf-hub:ORG/NAME[@rev]`, `local-dir:PATH`, or a plain path to a
    model folder or run directory. Hub weights must be safetensors and are checked against their sha256.
    """
    if name_or_id in ZOO:
        entry = ZOO[name_or_id]
        if not entry.published:
            raise UserError(f"{entry.name}: weights not published yet ({entry.repo_id} has not been uploaded). "
                            f"Train them with `sglr-zoo train {entry.recipe}` and load the run directory, "
                            f"e.g. sglr_zoo.load('runs/{Path(entry.recipe).stem}')")
        return f"local-dir:{download(entry.repo_id, entry.revision, sha256=entry.sha256)}"
    if name_or_id.startswith("hf-hub:"):
        repo_id, _, revision = name_or_id.removeprefix("hf-hub:").partition("@")
        return f"local-dir:{download(repo_id, revision or None)}"
    if name_or_id.startswith("local-dir:"):
        return name_or_id
    if Path(name_or_id).exists():
        return f"local-dir:{resolve_folder(Path(name_or_id))}"
    close = difflib.get_close_matches(name_or_id, list(ZOO), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    if not close and name_or_id.count("/") == 1:
        hint = f"; for a Hub repo write 'hf-hub:{name_or_id}'"
    raise UserError(f"cannot load {name_or_id!r}: not a zoo name, an existing path, 'hf-hub:ORG/NAME' or "
                    f"'local-dir:PATH'{hint}. See `sglr-zoo list`")


def load(name_or_id: str, *, weights: str | Path | None = None, num_classes: int | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """Returns an eval-mode model taking [0, 1] images, from anything `locate` accepts, or from a timm
    architecture name plus a `.safetensors` state dict (`weights`, with `num_classes`)."""
    if weights is not None:
        model = load_weights(name_or_id, weights, num_classes or 10)
    else:
        model = load_pretrained(locate(name_or_id))
    return model.to(device) if device is not None else model


def download(repo_id: str, revision: str | None = None, *, sha256: str | None = None) -> Path:
    """Fetches config.json + model.safetensors of a Hub repo into the HF cache and returns their folder.

    Refuses repos holding only pickle weights. The weights are hashed and compared with `sha256` (when given)
    and with the Hub's record of the file (the LFS sha256, or the git blob id of a small file).
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    remote = None
    if not constants.HF_HUB_OFFLINE:
        try:
            infos = HfApi().get_paths_info(repo_id, [WEIGHTS_NAME, "config.json", *PICKLE_NAMES], revision=revision)
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
        except _network_errors():
            remote = None  # unreachable: fall back to the local cache below
    if remote is not None:
        if WEIGHTS_NAME not in remote:
            pickles = sorted(set(remote) & set(PICKLE_NAMES))
            what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
            raise UserError(f"{where} has {what}; sglr_zoo loads {WEIGHTS_NAME} only (pickle files can run code). "
                            "Re-export with `sglr_zoo.models.save_pretrained` or `sglr-zoo push`")
        if "config.json" not in remote:
            raise UserError(f"{where} has no config.json: not a timm model repo (see `sglr-zoo push`)")
    try:
        files = [hf_hub_download(repo_id, name, revision=revision, local_files_only=remote is None)
                 for name in ("config.json", WEIGHTS_NAME)]
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        if remote is None:  # not in the cache, and the Hub was not reachable
            raise UserError(f"cannot download {where}: the Hub ({constants.ENDPOINT}) is unreachable or offline "
                            f"mode is on (HF_HUB_OFFLINE), and the files are not in the local cache "
                            f"({constants.HF_HUB_CACHE}). Connect once, or copy the model folder and load it "
                            "with 'local-dir:PATH'") from None
        raise UserError(f"cannot download {where}: {error}") from None
    except HfHubHTTPError as error:
        raise UserError(f"cannot download {where}: {error}") from None
    except _network_errors() as error:
        raise UserError(f"cannot download {where}: the Hub ({constants.ENDPOINT}) is unreachable ({error})") from None
    weights = Path(files[1])
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise UserError(f"{where}: {WEIGHTS_NAME} has sha256 {digest}, the zoo table expects {sha256}; the Hub "
                        f"files changed or the download is corrupt. Delete {weights.parent} and retry")
    info = remote.get(WEIGHTS_NAME) if remote else None
    if info is not None:
        expected, got = (info.lfs.sha256, digest) if info.lfs else (info.blob_id, _git_blob_id(data))
        if expected and got != expected:
            raise UserError(f"{where}: downloaded {WEIGHTS_NAME} does not match the Hub's record ({got} != "
                            f"{expected}); delete {weights.parent} and retry")
    if Path(files[0]).parent != weights.parent:
        raise UserError(f"{where}: config.json and {WEIGHTS_NAME} came from different revisions; retry")
    return weights.parent


def _git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub lists for files not stored in LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures: OSError covers huggingface_hub's offline errors; plus the HTTP client's own."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx", "requests"):
        module = sys.modules.get(client)
        error = getattr(module, "RequestError", None) or getattr(module, "RequestException", None)
        if isinstance(error, type):
            errors.append(error)
    return tuple(errors)
