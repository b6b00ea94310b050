"""Exports on the Hugging Face Hub: `hf://org/name[@revision]` resolved through the local Hub cache, and pushing an
export folder (weights, config.json, null caption and its model card) to a model repository.

Both go through huggingface_hub alone, so its cache (HF_HUB_CACHE, HF_HOME), HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN
behave as they do for every other Hub library.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import create_repo, get_token, snapshot_download, upload_folder
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from requests.exceptions import ConnectionError as RequestsConnectionError

from ..errors import MicroDiffusionError, UsageError, first_line
from ..exported import is_export
from ..utils.run_folder import EXPORT_CONFIG, MODEL_WEIGHTS
from .card import write_card

HF_PREFIX = "hf://"


def split_hub_id(spec: str) -> tuple[str, str | None]:
    """'hf://org/name@rev' -> ('org/name', 'rev'); a malformed id is a usage error naming it."""
    repo, _, revision = spec[len(HF_PREFIX):].partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"{spec} is not a Hub model id: write hf://ORG/NAME (optionally @REVISION)")
    return repo, revision or None


def resolve_model(model: str | Path) -> Path:
    """The local folder of a model: a path as given, or an `hf://org/name[@rev]` snapshot in the Hub cache
    (downloaded unless it is cached, or refused with HF_HUB_OFFLINE=1 when it is not)."""
    if not str(model).startswith(HF_PREFIX):
        return Path(model)
    spec = str(model)
    repo, revision = split_hub_id(spec)
    try:
        return Path(snapshot_download(repo, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise UsageError(f"{spec} is not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no "
                         "network): download it once online, or give a local export folder") from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UsageError(f"{spec}: no such model repository or revision on the Hub (or it is private: set HF_TOKEN)"
                         ) from err
    except HFValidationError as err:  # a name the Hub does not allow
        raise UsageError(f"{spec}: {first_line(err)}") from err
    except (HfHubHTTPError, RequestsConnectionError) as err:
        raise MicroDiffusionError(f"{spec}: the Hub answered {first_line(err)}") from err


def push(export: str | Path, repo_id: str, private: bool = False, refresh_card: bool = True) -> str:
    """Upload an export folder to the Hub model repository `repo_id` (created when absent); returns the commit's URL.

    With refresh_card the model card (README.md) is written again first, so evaluations run since the export are in it.
    """
    export = Path(export)
    if not is_export(export):
        raise UsageError(f"{export} is not an exported model folder (no {EXPORT_CONFIG} and {MODEL_WEIGHTS}): give a "
                         "folder written by `micro-diffusion export RUN --out DIR`")
    if repo_id.startswith(HF_PREFIX):
        repo_id = split_hub_id(repo_id)[0]
    if len(repo_id.split("/")) != 2 or not all(repo_id.split("/")):
        raise UsageError(f"REPO_ID {repo_id!r} is not ORG/NAME")
    if get_token() is None:
        raise UsageError("push needs a Hub token with write access: set HF_TOKEN or run `hf auth login`")
    if refresh_card:
        write_card(export, repo_id)
    try:
        create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = upload_folder(repo_id=repo_id, folder_path=export, repo_type="model",
                             commit_message=f"Upload {export.name} (micro-diffusion push)")
    except OfflineModeIsEnabled as err:
        raise UsageError(f"push {export} -> {repo_id}: HF_HUB_OFFLINE=1 forbids uploads; unset it to push") from err
    except HFValidationError as err:  # a name the Hub does not allow
        raise UsageError(f"REPO_ID {repo_id!r}: {first_line(err)}") from err
    except (HfHubHTTPError, RequestsConnectionError) as err:
        raise MicroDiffusionError(f"push {export} -> {repo_id}: {first_line(err)}") from err
    return str(info.commit_url)
