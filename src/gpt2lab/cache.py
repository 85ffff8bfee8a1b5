"""The gpt2lab download cache: `$GPT2LAB_CACHE`, else the platform's user cache folder.

A download lands under a temporary name, is checked against its sha256 when one is known,
and only then takes its final name, so a file in the cache is always complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from .errors import UserError
from .files import file_sha256, write_atomic

CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    override = os.environ.get("GPT2LAB_CACHE")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpt2lab"))


def download(url: str, filename: str, sha256: str | None = None, *, hint: str | None = None) -> Path:
    """The cached copy of `url` as `cache_dir() / filename`, downloading it if missing or corrupt.

    `hint` tells the user how to do without the download (e.g. "pass --input FILE with a local
    copy"); it ends the message of every failure.
    """
    target = cache_dir() / filename
    if target.is_file() and (sha256 is None or file_sha256(target) == sha256):
        return target
    way_around = f"; {hint}" if hint else ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the cache folder {target.parent} ({error.strerror}); "
            f"set GPT2LAB_CACHE to a writable folder{way_around}"
        ) from None

    def fetch(temp: Path) -> None:
        from tqdm import tqdm

        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response, open(temp, "wb") as out:
            size = response.headers.get("Content-Length")
            with tqdm(
                total=int(size) if size else None, unit="B", unit_scale=True, desc=filename, disable=None, leave=False
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise UserError(
                f"{filename} downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256}: "
                f"the file at that address is not the expected one{way_around}"
            )

    try:
        write_atomic(target, fetch)
    except UserError:
        raise
    # ValueError and HTTPException: malformed addresses and connections cut short.
    except (OSError, ValueError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise UserError(
            f"cannot download {filename} from {url} ({reason}) into {target.parent}{way_around}"
        ) from None
    return target
