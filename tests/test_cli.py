"""The break-glass CLI: status without Slack, its table and JSON, and its exit statuses."""
from __future__ import annotations

import json


def test_status_table_of_a_healthy_cluster(cluster, cli):
    proc = cli("status", "--endpoints", ",".join(cluster.endpoints))
    assert proc.returncode == 0, proc.stderr
    head, *rest = proc.stdout.splitlines()
    assert "HEALTHY: 3 of 3 voting members healthy, quorum needs 2, tolerates 1 more failure" in head
    table = "\n".join(rest)
    for column in ("NAME", "STATE", "CLIENT URL", "VERSION", "DB SIZE (IN USE)", "QUOTA USE", "RAFT INDEX", "ALARMS"):
        assert column in table
    assert max(len(line) for line in proc.stdout.splitlines()[1:]) <= 120, "the table fits a 120-column terminal"
    for name, member in cluster.members.items():
        row = next(line for line in rest if f" {name} " in line)
        assert member.client_url in row and (" leader " in row or " follower " in row)
    assert sum(1 for line in rest if " leader " in line) == 1  # exactly one leader


def test_status_json_shape(cluster, cli):
    proc = cli("status", "--endpoints", cluster.endpoints[0], "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["quorum"] == {"voting": 3, "healthy": 3, "needed": 2, "tolerates": 1, "ok": True}
    for m in data["members"]:
        assert set(m) >= {"id", "name", "peer_urls", "client_urls", "started", "is_learner", "reachable", "is_leader",
                          "version", "db_size", "raft_index", "errors"}
        assert len(m["id"]) == 16 and int(m["id"], 16) > 0
        assert m["reachable"] and m["started"] and not m["is_learner"] and m["errors"] == []
    assert sum(m["is_leader"] for m in data["members"]) == 1


def test_a_dead_member_exits_1_and_json_says_why(make_cluster, cli):
    c = make_cluster(3)
    c.kill("member2")
    proc = cli("status", "--endpoints", ",".join(c.all_endpoints), "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    dead = next(m for m in data["members"] if m["name"] == "member2")
    assert not dead["reachable"] and dead["errors"] == ["connection refused (member down?)"]
    assert data["quorum"] == {"voting": 3, "healthy": 2, "needed": 2, "tolerates": 0, "ok": True}
    members = cli("members", "--endpoints", ",".join(c.all_endpoints))
    assert members.returncode == 0 and members.stdout.count(", started, ") == 3


def test_nothing_answers_exits_1_with_one_line(tmp_path, cli):
    from bot.testing.cluster import free_port
    proc = cli("status", "--endpoints", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "UNREACHABLE" in proc.stderr and "connection refused" in proc.stderr


def test_mutual_tls_flags(make_cluster, cli):
    c = make_cluster(1, tls=True)
    ok = cli("status", "--endpoints", c.endpoints[0], "--cacert", c.tls.ca, "--cert", c.tls.client_cert,
             "--key", c.tls.client_key)
    assert ok.returncode == 0 and "HEALTHY" in ok.stdout
    refused = cli("status", "--endpoints", c.endpoints[0], "--cacert", c.tls.ca)
    assert refused.returncode == 1 and "client certificate" in refused.stderr


def test_bad_usage_exits_2_with_the_reason_and_the_usage(tmp_path, cli):
    for args, reason in [
        (("status",), "--endpoints URL[,URL...] (or --cluster NAME) is required"),
        (("status", "--endpoints", "10.0.0.1:2379"), "is not an http(s)://host:port URL"),
        (("status", "--endpoints", "http://h:1", "--cert", str(tmp_path / "nope.crt"), "--key", "x"), "no such file"),
        (("status", "--endpoints", "http://h:1", "--timeout", "0"), "--timeout must be greater than 0"),
        (("status", "--cluster", "prod"), "no config file"),
        (("frobnicate",), "invalid choice"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage: etcd-chatops" in proc.stderr and reason in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_status_of_a_configured_cluster(cluster, tmp_path, cli):
    from bot.testing.workspace import cluster_table, write_config
    config = write_config(tmp_path, [cluster_table("prod", cluster)])
    proc = cli("status", "--cluster", "prod", "--config", str(config))
    assert proc.returncode == 0 and proc.stdout.startswith("cluster prod: HEALTHY")
    unknown = cli("status", "--cluster", "staging", "--config", str(config))
    assert unknown.returncode == 2 and "no cluster named 'staging'" in unknown.stderr


def test_empty_endpoints_and_non_finite_timeouts_are_usage_errors(cli):
    timeout = "--timeout must be greater than 0 (a finite number of seconds)"
    for args, reason in [
        (("status", "--endpoints", ","), "--endpoints: no URL given in"),
        (("members", "--endpoints", " , "), "--endpoints: no URL given in"),
        (("status", "--endpoints", "http://h:1", "--timeout", "nan"), timeout),
        (("status", "--endpoints", "http://h:1", "--timeout", "inf"), timeout),
        (("status", "--endpoints", "http://h:1", "--timeout", "-1"), timeout),
    ]:
        proc = cli(*args)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and reason in errors[0], (args, proc.stderr)
        assert "usage: etcd-chatops" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_bad_cacert_is_one_line_without_grpc_noise(tmp_path, cli):
    import re
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    proc = cli("status", "--endpoints", "https://127.0.0.1:1", "--cacert", str(bad))
    assert proc.returncode == 2, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if re.match(r"[EWID]\d{4} ", line)], proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"--cacert: {bad}: not a PEM certificate" in errors[0], proc.stderr

