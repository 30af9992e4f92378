"""One boto3 S3 client per configured target, made once and shared by every thread.

boto3's clients are thread-safe; its sessions and resources are not. So a session is made
(under a lock) only to build the client, and the client is what the upload threads share.
Empty credentials leave them out, and boto3 finds its own (environment, shared files,
instance or task role).
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from mercure_target_s3.config import S3TargetConfig

try:
    __version__ = version("mercure-target-s3")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0"

_SESSION_LOCK = threading.Lock()  # boto3 sessions must not be built in several threads at once


def build_client(config: S3TargetConfig) -> Any:
    """An S3 client for ``config``; raises botocore's errors for an unusable configuration."""
    style = config.addressing_style
    if style == "auto":
        style = "path" if config.endpoint_url else "virtual"
    boto_config = BotoConfig(
        region_name=config.region or None,
        signature_version="s3v4",
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        # Retries are the plugin's own (see delivery.py): a PUT whose answer was lost is
        # checked with a HEAD before it is sent again, which botocore's retries cannot do.
        retries={"mode": "standard", "total_max_attempts": 1},
        # One connection per upload thread, plus the sending threads' own requests.
        max_pool_connections=config.parallel_uploads + 4,
        s3={"addressing_style": style},
        # The checksum is computed by this plugin from the bytes it sends and given with each
        # request; botocore must not add (or require) checksums of its own.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra=f"mercure-target-s3/{__version__}",
    )
    credentials: dict[str, str] = {}
    if not config.uses_chain:
        credentials = {
            "aws_access_key_id": config.access_key_id.strip(),
            "aws_secret_access_key": config.secret_access_key.strip(),
        }
        if config.session_token:
            credentials["aws_session_token"] = config.session_token.strip()
    with _SESSION_LOCK:
        session = boto3.session.Session(**credentials)
        return session.client("s3", endpoint_url=config.endpoint_url, config=boto_config)
