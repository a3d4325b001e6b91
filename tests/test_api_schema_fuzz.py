"""Schemathesis against the live schema of a real daphne, as a non-staff user, in
positive and negative mode: no request may give a server error, and every response
must match the schema. Seed and example count are fixed here, so a failure
reproduces with the same command (printed on failure)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tenants.models import Quota
from tests.conftest import make_api_token, make_server

ROOT = Path(__file__).resolve().parent.parent
SEED = 20260930
MAX_EXAMPLES = 12  # per operation and mode: about 170 requests, half a minute
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


@pytest.mark.django_db(transaction=True)
def test_the_api_never_errs_and_always_matches_its_schema(live_daphne, acme, alice, tmp_path):
    for name in ("gpu-01", "gpu-02"):
        make_server(name)
    # Generated batches may hold up to 1000 tasks: a small pending limit keeps the table
    # (and every later list) small, and exercises the limit's 400 as well.
    Quota.objects.filter(tenant=acme).update(max_pending_tasks=40)
    token = make_api_token(alice)
    headers = {"Authorization": f"Token {token}"}
    schema = httpx.get(f"{live_daphne}/api/schema/?format=json", headers=headers, timeout=30)
    assert schema.status_code == 200
    (tmp_path / "openapi.json").write_text(schema.text)

    argv = [str(Path(shutil.which("schemathesis", path=str(ROOT / ".venv" / "bin")) or "schemathesis")),
            "run", str(tmp_path / "openapi.json"), "--url", f"{live_daphne}/", "--header",
            f"Authorization: Token {token}", "--mode", "all", "--max-examples", str(MAX_EXAMPLES),
            "--seed", str(SEED), "--checks", CHECKS, "--phases", "fuzzing", "--workers", "1",
            "--no-shrink", "--request-timeout", "20", "--suppress-health-check", "all",
            "--exclude-checks", "negative_data_rejection,positive_data_acceptance", "--warnings", "off"]
    with open(tmp_path / "schemathesis.log", "w+") as out:
        result = subprocess.run(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=600)
        out.seek(0)
        print(out.read())  # the whole report, shown by pytest on failure
    assert result.returncode == 0, f"schemathesis found failures (report above); reproduce: {' '.join(argv)}"
    assert json.loads(schema.text)["paths"], "the schema lists no operations"


@pytest.mark.django_db
def test_the_schema_documents_every_error_status_and_the_nullable_fields(api_client_for, alice):
    schema = api_client_for(alice).get("/api/schema/?format=json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            documented = set(operation["responses"])
            assert {"400", "401", "403", "404", "429", "503"} <= documented, (method, path)
            assert "$ref" in json.dumps(operation["responses"]["400"]), (method, path)
    assert "409" in schema["paths"]["/api/v1/tasks/{id}/cancel/"]["post"]["responses"]
    task = schema["components"]["schemas"]["Task"]["properties"]
    assert all(task[name].get("nullable") for name in ("server", "submitter", "exit_code", "queue_position"))
    listing = {p["name"]: p for p in schema["paths"]["/api/v1/tasks/"]["get"]["parameters"]}
    assert listing["mine"]["schema"]["type"] == "boolean" and listing["ordering"]["schema"]["enum"]
    assert "mine" not in {p["name"] for p in schema["paths"]["/api/v1/tasks/{id}/"]["get"].get("parameters", [])}
