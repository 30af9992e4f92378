"""What is collected once a container ended: its log, and its output given back.

The log is read as a stream and only its end is kept (a module may print gigabytes). The
output of a module that wrote as another user is given back with ``chown -R`` as root in a
short helper container when the router cannot do it itself (it is not root), as mercure does.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from docker.errors import APIError, DockerException
from docker.types import Mount
from mercure.runners import CONTAINER_OUT_DIR, RunnerError

if TYPE_CHECKING:
    import docker


def read_log(client: docker.DockerClient, container_id: str, limit: int) -> str:
    """Standard output and error of a container, the last ``limit`` bytes of them."""
    chunks: deque[bytes] = deque()
    size = total = 0
    try:
        for chunk in client.api.logs(container_id, stdout=True, stderr=True, stream=True):
            chunks.append(chunk)
            size += len(chunk)
            total += len(chunk)
            while size - len(chunks[0]) >= limit:
                size -= len(chunks.popleft())
    except (DockerException, OSError) as exc:
        return f"[the container's log could not be read: {exc}]"
    data = b"".join(chunks)
    if len(data) > limit:
        data = data[-limit:]
    text = data.decode("utf-8", errors="replace")
    if total > len(data):
        text = f"[... {total - len(data)} earlier bytes not kept ...]\n" + text.split("\n", 1)[-1]
    return text


def chown_in_container(
    client: docker.DockerClient,
    image: str,
    name: str,
    host_folder: str,
    owner: str,
    labels: dict[str, str],
    timeout: float,
) -> None:
    """Run ``chown -R owner`` over ``host_folder`` as root, with only the capabilities it needs.

    The caller removes the container named ``name`` afterwards (also on failure).
    """
    try:
        helper = client.containers.create(
            image=image,
            name=name,
            entrypoint=["chown"],
            command=["-R", owner, CONTAINER_OUT_DIR],
            user="0:0",
            mounts=[Mount(CONTAINER_OUT_DIR, host_folder, type="bind")],
            network_mode="none",
            cap_drop=["ALL"],
            cap_add=["CHOWN", "DAC_OVERRIDE", "FOWNER"],
            labels=labels,
            detach=True,
        )
        helper.start()
        result = helper.wait(timeout=timeout)
        if int(result.get("StatusCode", 1)) != 0:
            said = helper.logs().decode("utf-8", errors="replace").strip()
            raise RunnerError(
                f"chown in image {image} exited with {result.get('StatusCode')}: {said} "
                "(set chown_image to an image with chown, such as busybox)"
            )
    except APIError as exc:
        raise RunnerError(f"chown in image {image} failed: {exc.explanation or exc}") from None


__all__ = ["chown_in_container", "read_log"]
