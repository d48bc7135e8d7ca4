"""The test bed's own promises that other tests rest on: the ports it hands out, and a member it says
started being that member."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bot.testing.cluster import ClusterError, LocalCluster, free_port, listening


def test_free_port_hands_out_no_port_twice_until_its_share_comes_round() -> None:
    """A test picks a replacement's ports when it proposes the plan and the member binds them at its start step,
    seconds later; meanwhile the next test's cluster starts in a thread of the same process. Picked at random,
    two of 500 ports from a share of 2,553 come out equal 49 times on average, so a cluster could take the
    replacement's client port and answer for it."""
    with ThreadPoolExecutor(2) as pool:
        ports = list(pool.map(lambda _: free_port(), range(500)))
    assert len(set(ports)) == len(ports)


class _Version(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server calls it by this name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"etcdserver":"3.5.1","etcdcluster":"3.5.0"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.e2e
def test_a_member_whose_client_port_another_process_holds_fails_to_start_and_says_why(tmp_path: Path) -> None:
    """What made a replacement's learner 'not started within 60s' in a quiet run: its client port was another
    process's, which answered /version for it while the member exited on its bind error, so the launcher said
    started. Now the wait asks that the member itself listens there."""
    squatter = ThreadingHTTPServer(("127.0.0.1", free_port()), _Version)
    thread = threading.Thread(target=squatter.serve_forever, daemon=True)
    thread.start()
    try:
        with LocalCluster(1, base_dir=tmp_path / "c") as c:
            member1 = c.member("member1")
            assert member1.pid is not None and listening(member1.pid, member1.client_port)
            peer = free_port()
            c.etcdctl("member", "add", "member2", f"--peer-urls=http://127.0.0.1:{peer}")
            initial = f"member1={member1.peer_url},member2=http://127.0.0.1:{peer}"
            with pytest.raises(ClusterError, match="member2 exited while starting") as failed:
                c.start_member("member2", initial, client_port=squatter.server_address[1], peer_port=peer,
                               timeout=10)
            assert "address already in use" in str(failed.value)
            assert not listening(member1.pid, squatter.server_address[1])
    finally:
        squatter.shutdown()
        squatter.server_close()
