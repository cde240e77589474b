"""Weights by name -> a cached file: `hf-hub:ORG/REPO[@REVISION]` (the Hugging Face Hub) or `timm:MODEL[.TAG]`
(timm's own pretrained cfg: its Hub repo when it names one, else its URL through torch.hub's cache).

Files come through the libraries' own caches, so HF_HOME / HF_HUB_CACHE, the token (HF_TOKEN or
`hf auth login`) and TORCH_HOME mean what they mean for timm; HF_HUB_OFFLINE=1 keeps both spellings off the
network. A cached file is used without asking the network (a node without it answers at once, not after
retries). Under DDP only local rank 0 of each node downloads; every rank then learns its outcome in one
collective, so N ranks cost one download per node and a failure is the same one line on every rank, never
a wait. Nothing is fetched at import time.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

import torch.distributed as dist
import torch.hub
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import get_pretrained_cfg, list_pretrained

from gcvit.models.checkpoint import CheckpointError

HUB, TIMM = "hf-hub:", "timm:"
# What timm pushes to its Hub repos, in the order timm's loader tries them (safetensors needs no unpickling).
FILES = ("model.safetensors", "pytorch_model.bin")
HINT = "timm's GC ViT weights are timm:gcvit_{xxtiny,xtiny,tiny,small,base}.in1k (docs/finetuning.md)"
TODO = "or pass the weights file's path"


def is_named(spec: object) -> bool:
    """Whether `spec` names weights (hf-hub: or timm:) rather than a file."""
    return isinstance(spec, str) and spec.startswith((HUB, TIMM))


def split(spec: str) -> tuple[str, str | None]:
    """'hf-hub:timm/gcvit_tiny.in1k@main' -> ('timm/gcvit_tiny.in1k', 'main'); no revision -> None."""
    repo, _, revision = spec.removeprefix(HUB).partition("@")
    return repo, revision or None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it (constants.HF_HUB_OFFLINE: in every version)."""
    return bool(constants.HF_HUB_OFFLINE)


def failed(where: str, what: str, cache: str, e: Exception) -> CheckpointError:
    """One line for a download that broke (HTTP 5xx/429, a full disk, a dropped connection...)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return CheckpointError(f"{where}: fetching {what} into {cache} failed ({type(e).__name__}: {first}); "
                           "check the network and the free space there (HF_HOME / TORCH_HOME move it), "
                           f"retry, {TODO}")


def fetch(spec: str, what: str, local_files_only: bool = False) -> str:
    """The cached file of name `spec` (downloaded when missing and allowed); a one-line CheckpointError
    naming `what`, the name, the cache and what to do when it cannot be had."""
    if spec.startswith(TIMM):
        return _timm_file(spec, f"{what}={spec}", local_files_only)
    return _hub_file(spec, f"{what}={spec}", local_files_only)


def _hub_file(spec: str, where: str, local_files_only: bool) -> str:
    repo, revision = split(spec)
    if repo.count("/") != 1:
        raise CheckpointError(f"{where}: a Hub name is hf-hub:ORG/REPO[@REVISION]; {HINT}")
    cache = constants.HF_HUB_CACHE
    try:
        cached = [try_to_load_from_cache(repo, name, revision=revision) for name in FILES]
    except HFValidationError as e:
        raise CheckpointError(f"{where}: not a valid Hub name ({str(e).splitlines()[0]}); {HINT}") from None
    hit = next((c for c in cached if isinstance(c, str)), None)
    if hit is not None:
        return hit
    if local_files_only or offline():
        why = "HF_HUB_OFFLINE=1" if offline() else "local rank 0 of this node did not fetch it"
        rev = f" --revision {revision}" if revision else ""
        raise CheckpointError(f"{where}: not in the Hub cache {cache} and {why}; fetch it once where the Hub "
                              f"is reachable, with the same HF_HOME (`hf download {repo}{rev}`), {TODO}")
    for name in FILES:
        try:
            return hf_hub_download(repo, name, revision=revision, library_name="gcvit-train")
        except EntryNotFoundError:  # the repository exists but lacks this file: try the next one
            continue
        except RepositoryNotFoundError:  # also gated and private repositories without a token
            raise CheckpointError(f"{where}: no such repository on the Hub (or it is gated/private: set "
                                  f"HF_TOKEN or run `hf auth login`); {HINT}") from None
        except RevisionNotFoundError:
            raise CheckpointError(f"{where}: {repo} has no revision {revision!r}; drop @{revision} for the "
                                  "latest") from None
        except Exception as e:  # any other failure is one line, not a traceback
            raise failed(where, f"{repo}/{name}", f"the Hub cache {cache}", e) from None
    raise CheckpointError(f"{where}: {repo} has neither {' nor '.join(FILES)}; {TODO}")


def _timm_file(spec: str, where: str, local_files_only: bool) -> str:
    model = spec.removeprefix(TIMM)
    try:
        cfg = get_pretrained_cfg(model)
    except RuntimeError:  # a known architecture with an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        arch = model.partition(".")[0]
        known = ", ".join(list_pretrained(f"{arch}.*")) or f"none for {arch}"
        raise CheckpointError(f"{where}: timm has no pretrained weights of that name (its tags: {known}); "
                              f"{HINT}")
    if cfg.hf_hub_id:
        return _hub_file(HUB + cfg.hf_hub_id, where, local_files_only)
    name = os.path.basename(urlparse(cfg.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)  # where timm's own download puts it
    if os.path.isfile(path):
        return path
    if local_files_only or offline():
        why = "HF_HUB_OFFLINE=1" if offline() else "local rank 0 of this node did not fetch it"
        raise CheckpointError(f"{where}: not in torch.hub's cache ({path}) and {why}; download {cfg.url} to "
                              f"that path where the network is reachable, with the same TORCH_HOME, {TODO}")
    sha = torch.hub.HASH_REGEX.search(name)  # timm's file names carry a sha256 prefix: checked, as timm does
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(cfg.url, path, sha.group(1) if sha else None, progress=False)
        return path
    except Exception as e:  # an unreachable URL, a full disk, a hash mismatch: one line
        raise failed(where, cfg.url, f"torch.hub's cache {os.path.dirname(path)}", e) from None


def resolve(spec: str, what: str, local_rank: int = 0) -> str:
    """`spec` itself when it is a path; the cached file of a name otherwise, fetched by local rank 0 only when
    a process group is up (after one all-gather every rank has each node's outcome: a failure anywhere is
    the same one line on every rank; else the other ranks read the cache without asking the network)."""
    if not is_named(spec):
        return spec
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fetch(spec, what)
    path, error = None, None
    if local_rank == 0:
        try:
            path = fetch(spec, what)
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # whatever breaks, the other ranks must hear of it
            error = str(failed(f"{what}={spec}", spec, "its cache", e))
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, error)
    first = next((e for e in outcomes if e is not None), None)
    if first is not None:
        raise CheckpointError(first)
    return path or fetch(spec, what, local_files_only=True)
