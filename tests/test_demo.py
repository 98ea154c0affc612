"""``sharedcare demo`` as a new user runs it: one command, then the commands it prints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def test_demo_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("SHAREDCARE_DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedcare.cli", "demo", "--port", "0", "--data-dir", str(data), "--people", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(
        target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True
    )  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not (data / "demo.json").exists() or not any("Ctrl-C" in line for line in out):
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "demo.json was not written in 120 s"
            time.sleep(0.2)
        demo = json.loads((data / "demo.json").read_text())
        assert set(demo) == {
            "base_url",
            "token_url",
            "consumer",
            "providers",
            "people",
            "pds_base_url",
        }
        assert set(demo["consumer"]) == {"client_id", "kid", "alg", "private_key_file", "scopes"}
        assert demo["consumer"]["alg"] == "RS384"
        assert (
            Path(demo["consumer"]["private_key_file"])
            .read_text()
            .startswith("-----BEGIN PRIVATE KEY-----")
        )
        assert "system/AuditEvent.rs" in demo["consumer"]["scopes"]
        assert len(demo["providers"]) == 3
        assert (
            sum(1 for p in demo["people"] if len(p["providers"]) >= 2) >= len(demo["people"]) // 2
        )
        assert httpx.get(f"{demo['pds_base_url']}/metadata").status_code == 200
        text = "".join(out)
        assert demo["base_url"] in text

        # The ready-to-paste command: a token, then a federated query with curl.
        curl = next(line.strip() for line in out if line.strip().startswith("TOKEN=$("))
        pasted = subprocess.run(
            ["bash", "-c", curl], check=False, capture_output=True, text=True, env=env, timeout=60
        )
        assert pasted.returncode == 0, pasted.stderr
        bundle = json.loads(pasted.stdout)
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        assert any(e["search"]["mode"] == "match" for e in bundle["entry"])

        # sharedcare query prints the merged result as a table.
        command = next(line.strip() for line in out if line.strip().startswith("sharedcare query"))
        nhs = re.search(r"--nhs-number (\d{10})", command).group(1)  # type: ignore[union-attr]
        shown = subprocess.run(
            ["bash", "-c", command],
            check=False,
            capture_output=True,
            text=True,
            env={**env, "COLUMNS": "200"},
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert f"Observation for NHS number {nhs}" in shown.stdout
        held = next(p["providers"] for p in demo["people"] if p["nhs_number"] == nhs)
        shown_providers = {p for p in held if p in shown.stdout}
        assert (
            shown_providers == set(held) or "!" in shown.stdout
        )  # an impaired provider gets a line
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            reader.join(5)
            errors = proc.stderr.read()  # type: ignore[union-attr]
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
    assert code == 0, errors
    assert "Traceback" not in errors
    assert "Demo stopped." in errors
