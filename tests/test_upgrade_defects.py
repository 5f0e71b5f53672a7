"""Upgrade defects, each caught by the test named after it: a transaction's results credited to
another EXEC, a client's close hidden from the server while the new image starts, and a
configuration file that has to stay on disk through the pause."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hiredis
import pytest
import yaml

from helpers import RawClient, encode, wait_for
from upgrade_support import (
    BackgroundUpgrade,
    _script,
    interpreter_gated_at_restore,
    status,
    terminate_pid,
    upgrade,
    upgrade_ok,
)


def blocked_in(direct, command: str) -> int:
    """How many of the server's clients are blocked in `command` right now."""
    return sum(1 for c in direct.client_list()
               if c.get("cmd") == command and "b" in c.get("flags", ""))


def respell_sink_address(proxy) -> None:
    """Name the same server as `localhost:PORT` instead of `127.0.0.1:PORT`: the next image
    cannot take over the upstream connections (they were made to another address), so it
    opens new ones and brings each to the state the client's session records."""
    topology = yaml.safe_load(proxy.topology_path.read_text())
    sink = topology["sources"][0]["Redis"]["chain"][-1]["RedisSinkSingle"]
    host, port = sink["remote_address"].rsplit(":", 1)
    assert host == "127.0.0.1", sink
    sink["remote_address"] = f"localhost:{port}"
    proxy.topology_path.write_text(yaml.safe_dump(topology))


@pytest.mark.parametrize("selects, expected_db", [(("99",), 0), (("5",), 5), (("5", "99"), 5)],
                         ids=["select-fails", "select-succeeds", "select-succeeds-then-fails"])
def test_each_exec_of_a_pipeline_gets_its_own_results(proxy, redis_server, selects,
                                                      expected_db):
    """Transactions in one write, the first with nothing the proxy tracks, then one SELECT in
    each of the others (out of range: EXEC answers an error for it). A later EXEC's results
    must not be taken for an earlier one's, or the session the proxy records names a database
    the connection is not in, and the upgrade that rebuilds the upstream connection from that
    record moves the client there (or fails its commands)."""
    with RawClient(proxy.port) as client:
        pipeline = encode("MULTI") + encode("SET", "k", "v") + encode("EXEC")
        for db in selects:
            pipeline += encode("MULTI") + encode("SELECT", db) + encode("EXEC")
        client.send(pipeline)
        replies = client.read_replies(3 + 3 * len(selects))
        assert replies[:3] == [b"OK", b"QUEUED", [b"OK"]], replies
        for index, db in enumerate(selects):
            multi, queued, (select_result,) = replies[3 + 3 * index:6 + 3 * index]
            assert (multi, queued) == (b"OK", b"QUEUED"), replies
            if int(db) < 16:  # redis-server's default number of databases
                assert select_result == b"OK", replies
            else:
                assert isinstance(select_result, hiredis.ReplyError), replies
        assert client.call("SET", "before", "1") == b"OK"

        # First the upstream connection is handed over as it is (the session record crosses
        # with it), then an upgrade has to open a new one from that record.
        upgrade_ok(proxy)
        assert client.call("GET", "before") == b"1"
        respell_sink_address(proxy)
        result = upgrade_ok(proxy)
        assert "closed 0" in result.stdout, result

        assert client.call("GET", "before") == b"1"
        assert client.call("SET", "after", "2") == b"OK"
    with redis_server.client(db=expected_db) as direct:
        assert direct.mget("k", "before", "after") == [
            b"v" if expected_db == 0 else None, b"1", b"2"]
    with redis_server.client() as db0:
        assert db0.get("k") == b"v"


def test_client_leaving_while_the_new_image_starts_is_gone_for_the_server(proxy, redis_server,
                                                                          tmp_path):
    """While the old version's bridge serves alone (the new image waits for a gate), a client
    blocked in BLPOP hangs up: the server must see its connection end at once, not when the
    new image lets go of its inherited copy, or the BLPOP takes the next value pushed and the
    value is lost."""
    direct = redis_server.client()
    gate = tmp_path / "gate"
    python = interpreter_gated_at_restore(tmp_path, gate)
    with RawClient(proxy.port) as other:
        assert other.call("SET", "kept", "yes") == b"OK"
        blocked = RawClient(proxy.port)
        blocked.send(encode("BLPOP", "q", 0))
        wait_for(lambda: blocked_in(direct, "blpop") == 1, 10, "the BLPOP to block in redis")
        offset = len(proxy.log_text())
        run = BackgroundUpgrade(proxy.control_socket, tmp_path, "--python", python,
                                "--timeout", "30")
        try:
            proxy.wait_log("serves every client until it is ready", start=offset)
            blocked.close()
            wait_for(lambda: blocked_in(direct, "blpop") == 0, 10,
                     "redis to see the blocked client go (the new image still waits)")
            assert not gate.exists() and run.running
            assert direct.rpush("q", "job") == 1
            assert direct.lrange("q", 0, -1) == [b"job"]
        finally:
            blocked.close()
            gate.touch()
            result = run.wait()
        assert result.returncode == 0 and "upgraded" in result.stdout, result
    assert direct.lrange("q", 0, -1) == [b"job"]
    with RawClient(proxy.port) as again:
        assert again.call("GET", "kept") == b"yes"
    assert status(proxy.control_socket)["generation"] == 1


def interpreter_removing_config_after_check(directory: Path, config: Path, saved: Path) -> str:
    """The real interpreter, except that once the preflight `check` has passed it moves the
    proxy's config file away (to `saved`), as an operator tidying up might."""
    return _script(directory, "python-removing-config", f"""\
if [ "$1 $2 $3" = "-m shotover_gevent check" ]; then
  "{sys.executable}" "$@"
  status=$?
  if [ $status -eq 0 ]; then cp "{config}" "{saved}" && rm -f "{config}"; fi
  exit $status
fi
exec "{sys.executable}" "$@"
""")


def test_config_file_removed_after_the_preflight(proxy, redis_server, tmp_path):
    """The configuration the preflight validated is what the new version runs on: the files
    are not read again inside the pause, so one gone by then does not fail the upgrade."""
    saved = tmp_path / "config.yaml.saved"
    python = interpreter_removing_config_after_check(tmp_path, proxy.config_path, saved)
    try:
        with RawClient(proxy.port) as first, RawClient(proxy.port) as second:
            assert first.call("SET", "k", "v") == b"OK"
            assert second.call("SELECT", "3") == b"OK"
            assert second.call("SET", "k3", "v3") == b"OK"

            result = upgrade_ok(proxy, "--python", python)

            assert not proxy.config_path.exists() and saved.exists()
            assert "closed 0" in result.stdout, result
            assert first.call("GET", "k") == b"v"
            assert second.call("GET", "k3") == b"v3"
        assert status(proxy.control_socket)["generation"] == 1
    finally:
        if saved.exists() and not proxy.config_path.exists():
            shutil.copyfile(saved, proxy.config_path)
        stop_rolled_back_bridge(proxy)


def stop_rolled_back_bridge(proxy) -> None:
    """After a rolled-back upgrade the old version's bridge process serves on under its own
    pid, which the fixture does not know: stop it here."""
    try:
        serving = status(proxy.control_socket)["pid"]
    except (AssertionError, OSError, ValueError):
        return
    if serving != proxy.pid:
        terminate_pid(serving)


#: Start-up code for the stand-in below: what the new image runs after adopting raises.
_BREAK_AFTER_ADOPTION = ("import shotover_gevent.handover.restore as r; "
                         "r._close_unnamed_fds = lambda keep: 1 / 0; ")


def interpreter_failing_after_adoption(directory: Path) -> str:
    """The real interpreter, except that in the new image the step after adopting the
    connections (closing the inherited fds nobody named, then reporting) raises."""
    return _script(directory, "python-failing-after-adoption", f"""\
case " $* " in
  *" --restore "*) ;;
  *) exec "{sys.executable}" "$@" ;;
esac
[ "$2" = "-c" ] || {{ echo "stand-in interpreter: unexpected arguments: $*" >&2; exit 98; }}
boot=$(printf '%s' "$3" | sed 's|_run()$|{_BREAK_AFTER_ADOPTION}_run()|')
shift 3
exec "{sys.executable}" -S -c "$boot" "$@"
""")


def test_failure_after_adoption_still_serves_everyone_and_answers(proxy, redis_server,
                                                                  tmp_path):
    """An exception in the new image's follow-up work (after the pause) used to leave the idle
    connections it had not adopted yet unserved and the CLI without an answer."""
    clients = [RawClient(proxy.port) for _ in range(150)]  # more than one adoption batch
    try:
        for index, client in enumerate(clients):
            assert client.call("SET", f"k{index}", index) == b"OK"
        result = upgrade(proxy.control_socket, "--python",
                         interpreter_failing_after_adoption(tmp_path))
        assert result.returncode == 0, result
        assert "internal error while finishing the upgrade" in result.stdout, result
        for index, client in enumerate(clients):
            assert client.call("GET", f"k{index}") == str(index).encode()
    finally:
        for client in clients:
            client.close()
