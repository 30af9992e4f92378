"""SSH_ASKPASS helper: asks the router process for the answer to ssh's prompt.

ssh runs this program with its prompt as the only argument and reads the answer from its
standard output. The answer comes over the Unix socket named in ``MERCURE_ASKPASS_SOCKET``
(in a folder only the router's user can enter), so no password is ever on a command line, in
an environment or in a file. Standard library only, run with ``python -I -S``: it must start
fast and import nothing of the router.
"""

import os
import socket
import sys


def main() -> int:
    path = os.environ.get("MERCURE_ASKPASS_SOCKET", "")
    prompt = (sys.argv[1] if len(sys.argv) > 1 else "").replace("\n", " ")
    if not path:
        return 1
    chunks = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(prompt.encode("utf-8", "replace") + b"\n")
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return 1
    answer = b"".join(chunks)
    if not answer:
        return 1  # no answer for this prompt: ssh gives up on it
    sys.stdout.buffer.write(answer + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
