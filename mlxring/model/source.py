"""Where a model comes from: a local directory, or a Hugging Face repo id ("org/name")
resolved to its snapshot in the local Hugging Face cache (downloaded if need be)."""

from __future__ import annotations

import os
import re

from mlxring.errors import UserError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what a shard and the tokenizer read; never other weight formats
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.tiktoken", "*.txt"]


def is_repo_id(spec: str) -> bool:
    """Whether `spec` reads as a Hugging Face repo id ("org/name")."""
    return bool(_REPO_ID.fullmatch(spec)) and ".." not in spec


def resolve_model(spec: str) -> str:
    """The local model directory for `spec`: a directory itself, or a repo id's snapshot
    (honouring HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE). Anything else comes back as it
    is, for the caller's "no such directory"."""
    if os.path.isdir(spec) or not is_repo_id(spec):
        return spec
    # lazy: huggingface_hub (and its HTTP client) only when a repo id is given
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (  # where 0.23 has them too
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    fix = f"download it (hf download {spec}) or pass a model directory"
    try:
        return snapshot_download(repo_id=spec, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        raise UserError(
            f"model {spec}: no such directory, and the Hugging Face repo is not in the local "
            f"cache and cannot be downloaded (offline or no network); {fix}"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise UserError(
            f"model {spec}: no such directory, and no Hugging Face repo {spec} this machine may "
            "read (private or gated repos need `hf auth login`); pass a model directory"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model {spec}: no such directory, and it cannot be fetched from Hugging Face "
            f"({why}); {fix}"
        ) from None
