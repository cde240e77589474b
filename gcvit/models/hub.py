"""Weights named on the Hugging Face Hub (`hf-hub:ORG/REPO[@REVISION]`, timm's spelling) -> a cached file.

The file comes through huggingface_hub's own cache, so HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and the token
(HF_TOKEN or `hf auth login`) mean what they mean for timm and transformers. Under DDP only local rank 0 of
each node asks the Hub; the node's other ranks wait at a barrier and then read the cache without a request,
so N ranks cost one download per node, not N. Nothing is fetched at import time.
"""
from __future__ import annotations

import torch.distributed as dist
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from gcvit.models.checkpoint import CheckpointError

PREFIX = "hf-hub:"
# What timm pushes to its Hub repos, in the order timm's loader tries them (safetensors needs no unpickling).
FILES = ("model.safetensors", "pytorch_model.bin")
HINT = "timm's GC ViT weights are hf-hub:timm/gcvit_{xxtiny,xtiny,tiny,small,base}.in1k (docs/finetuning.md)"


def is_hub_name(spec: object) -> bool:
    """Whether `spec` names Hub weights rather than a file."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def split(spec: str) -> tuple[str, str | None]:
    """'hf-hub:timm/gcvit_tiny.in1k@main' -> ('timm/gcvit_tiny.in1k', 'main'); no revision -> None."""
    repo, _, revision = spec.removeprefix(PREFIX).partition("@")
    return repo, revision or None


def fetch(spec: str, what: str, local_files_only: bool = False) -> str:
    """The cached file of Hub name `spec` (downloaded when missing and allowed); a one-line
    CheckpointError naming `what`, the name and the cache when it cannot be had."""
    repo, revision = split(spec)
    where = f"{what}={spec}"
    if repo.count("/") != 1:
        raise CheckpointError(f"{where}: a Hub name is hf-hub:ORG/REPO[@REVISION]; {HINT}")
    uncached = False
    for name in FILES:
        try:
            return hf_hub_download(repo, name, revision=revision, local_files_only=local_files_only,
                                   library_name="gcvit-train")
        except LocalEntryNotFoundError:  # offline, or no connection, and not in the cache
            uncached = True
        except EntryNotFoundError:  # the repository exists but lacks this file: try the next one
            continue
        except RepositoryNotFoundError:  # also gated and private repositories without a token
            raise CheckpointError(
                f"{where}: no such repository on the Hub (or it is gated/private: set HF_TOKEN or run "
                f"`hf auth login`); {HINT}") from None
        except RevisionNotFoundError:
            raise CheckpointError(f"{where}: {repo} has no revision {revision!r}; drop @{revision} for "
                                      "the latest") from None
        except HFValidationError as e:
            raise CheckpointError(f"{where}: not a valid Hub name ({str(e).splitlines()[0]}); "
                                      f"{HINT}") from None
    if uncached:
        why = "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else "the Hub was not reachable"
        raise CheckpointError(
            f"{where}: not in the Hub cache {constants.HF_HUB_CACHE} and {why}; fetch it once where the Hub "
            f"is reachable, with the same HF_HOME (`hf download {repo}`), or pass the weights file's path")
    raise CheckpointError(f"{where}: {repo} has neither {' nor '.join(FILES)}; pass a weights file's "
                              "path")


def resolve(spec: str, what: str, local_rank: int = 0) -> str:
    """`spec` itself when it is a path; the cached file of a Hub name otherwise, fetched by local rank 0 only
    when a process group is up (the others wait for it, then read the cache without asking the Hub)."""
    if not is_hub_name(spec):
        return spec
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fetch(spec, what)
    path, error = None, None
    if local_rank == 0:
        try:
            path = fetch(spec, what)
        except CheckpointError as e:  # raised after the barrier: the waiting ranks are not left hanging
            error = e
    dist.barrier()
    if error is not None:
        raise error
    return path or fetch(spec, what, local_files_only=True)
