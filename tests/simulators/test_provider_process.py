"""A provider simulator in a child process: same records as in-process, faults over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from sharedcare.simulators.provider import ProviderConfig, ProviderServer
from sharedcare.simulators.provider_process import (
    ProviderProcess,
    config_from_json,
    config_to_json,
)


@pytest.mark.parametrize(
    "config",
    [
        ProviderConfig(id="a"),
        ProviderConfig(
            id="b.c", identifier_system="urn:oid:1.2.3", people=7, seed=9, share=0.5,
            latency_ms=(5, 50), error_rate=0.1, timeout_rate=0.1, malformed_rate=0.1, hang_s=2,
            fault_seed=3, resources_per_search=2, resource_bytes=0, default_count=5,
            max_count=9, include_total=False, as_of=date(2024, 6, 1), name="B",
        ),
    ],
)  # fmt: skip
def test_config_survives_the_trip_to_the_child(config: ProviderConfig) -> None:
    assert config_from_json(config_to_json(config)) == config


def test_child_process_serves_the_same_records_and_takes_faults_over_http() -> None:
    config = ProviderConfig(id="child-pas", people=12, resource_bytes=0)
    with ProviderServer(config) as here, ProviderProcess(config) as child, httpx.Client() as http:
        assert child.people == here.people
        local = child.people[0].local_id

        def ids(base: str) -> list[str]:
            bundle = http.get(f"{base}/Observation", params={"patient": local}).json()
            return [e["resource"]["id"] for e in bundle["entry"]]

        assert ids(child.base_url) == ids(here.base_url)
        assert child.set_faults(error_rate=1.0)["error_rate"] == 1.0
        assert (
            http.get(f"{child.base_url}/Observation", params={"patient": local}).status_code >= 500
        )
        proc = child.proc
    assert proc is not None and proc.returncode == 0  # stopped cleanly by Ctrl-C


def test_child_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from sharedcare.simulators.provider import ProviderConfig\n"
        "from sharedcare.simulators.provider_process import ProviderProcess\n"
        "p = ProviderProcess(ProviderConfig(id='orphan', people=3, resource_bytes=0))\n"
        "p.start()\n"
        "print(p.proc.pid, p.base_url, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid, url = parent.stdout.readline().split()
    assert httpx.get(f"{url}/metadata", timeout=10).status_code == 200
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 30
    while _alive(int(child_pid)):
        assert time.monotonic() < deadline, "the orphaned provider kept running"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().split()[2] != "Z"  # a zombie has exited
