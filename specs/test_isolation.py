"""The guest under test reaches nothing on the build host but what is forwarded to it.

Images under test are not yet trusted: from the verify network (QEMU user networking, host at
10.0.2.2) a guest must not reach the host's loopback services, such as an OpenNebula front-end or
another instance's SSH forward. A recipe that needs outbound access says so in [verify].
"""

from __future__ import annotations

import socket
from typing import Any

HOST_FROM_GUEST = "10.0.2.2"


def test_guest_cannot_reach_the_hosts_loopback(host: Any, built_image: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        # The probe itself works: the guest reaches its own sshd the same way.
        own = host.run("timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/22 && head -c 4 <&3'")
        assert own.stdout.startswith("SSH-"), f"the probe does not work in this guest: {own.stderr}"
        probe = host.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{HOST_FROM_GUEST}/{port}'")
        try:
            conn, _ = listener.accept()
            conn.close()
            reached = True
        except BlockingIOError:
            reached = False
    outbound = built_image.recipe is not None and built_image.recipe.verify.network == "outbound"
    if outbound:
        assert probe.rc == 0 and reached, "the recipe asks for outbound access, but the guest has none"
    else:
        assert probe.rc != 0 and not reached, (
            f"the guest under test reached a listener on the build host's loopback ({HOST_FROM_GUEST}:{port})")
