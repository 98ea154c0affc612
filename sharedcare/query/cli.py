"""``sharedcare query``: run a federated query and print the merged result as a table (issue 6).

Credentials come from the demo's ``demo.json`` (default ``sharedcare-demo/demo.json``) or
from options: ``--base-url``, ``--client-id`` and ``--key`` (a PEM private key, PKCS#8, or a
private JWK file from ``sharedcare participants keygen``). The command gets a SMART Backend
Services token with the end-user claims given in ``--end-user``, searches
``{base}/{TYPE}?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{N}``, follows ``next``
links up to ``--pages``, and prints one row per resource and one line per impaired provider.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

NHS = "https://fhir.nhs.uk/Id/nhs-number"
DEFAULT_END_USER = (
    '{"requesting_user":{"id":"C123456","name":"Dr Ann Example","role":"R8000"},'
    '"requesting_organization":"RR8","reason_for_access":"TREAT"}'
)
console = Console()
errors = Console(stderr=True)


def _load_key(path: Path, kid: str | None, alg: str | None) -> Any:
    from joserfc.jwk import ECKey, RSAKey

    raw = path.read_bytes()
    if raw.lstrip().startswith(b"{"):
        data = json.loads(raw)
        return ECKey.import_key(data) if data.get("kty") == "EC" else RSAKey.import_key(data)
    params: dict[str, Any] = {}
    if kid:
        params["kid"] = kid
    if alg:
        params["alg"] = alg
    try:
        return RSAKey.import_key(raw, parameters=params)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not RSA: try EC, which raises a useful error itself
        return ECKey.import_key(raw, parameters=params)  # type: ignore[arg-type]


def _summary(resource: dict[str, Any]) -> tuple[str, str]:
    """(when, what) for a table row, from the common clinical elements."""
    when = ""
    for name in (
        "effectiveDateTime", "issued", "recordedDate", "onsetDateTime", "authoredOn", "occurrenceDateTime",
        "performedDateTime", "date", "created",
    ):  # fmt: skip
        if isinstance(resource.get(name), str):
            when = resource[name]
            break
    if not when and isinstance(resource.get("period"), dict):
        when = str(resource["period"].get("start", ""))
    what = ""
    for name in ("code", "medicationCodeableConcept", "vaccineCode", "type", "class"):
        concept = resource.get(name)
        if isinstance(concept, list):
            concept = concept[0] if concept else None
        if isinstance(concept, dict):
            coding = (concept.get("coding") or [{}])[0]
            what = concept.get("text") or coding.get("display") or coding.get("code") or ""
            break
    value = resource.get("valueQuantity")
    if isinstance(value, dict) and "value" in value:
        what += f" = {value['value']} {value.get('unit', '')}".rstrip()
    return when[:19], str(what)


def query(
    resource_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="Resource type, e.g. Observation.")
    ],
    nhs_number: Annotated[str, typer.Option(help="The person's NHS number.")],
    demo_json: Annotated[
        Path | None,
        typer.Option(
            help="demo.json written by `sharedcare demo` (the default source of credentials)."
        ),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="The hub's FHIR base URL.")] = None,
    client_id: Annotated[str | None, typer.Option(help="Your system's client_id.")] = None,
    key: Annotated[
        Path | None, typer.Option(help="Your private key: PEM (PKCS#8) or a private JWK file.")
    ] = None,
    scope: Annotated[str, typer.Option(help="Scopes to ask for.")] = "system/*.rs",
    end_user: Annotated[str, typer.Option(help="End-user claims as JSON.")] = DEFAULT_END_USER,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="Extra search parameter NAME=VALUE (repeatable)."),
    ] = None,
    wait_ms: Annotated[
        int | None,
        typer.Option(help="X-Provider-Wait-Time: how long the hub waits for each provider."),
    ] = None,
    pages: Annotated[int, typer.Option(min=1, help="Most pages to follow.")] = 10,
) -> None:
    """Run a federated query and print the merged result as a table, with a line per impaired provider."""
    import httpx

    from sharedcare.iam.client import sign_assertion, token_form

    kid = alg = None
    if base_url is None or client_id is None or key is None:
        path = demo_json or Path("sharedcare-demo") / "demo.json"
        try:
            demo = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            errors.print(
                f"[red]No credentials:[/red] give --base-url, --client-id and --key, or run `sharedcare demo` "
                f"and point --demo-json at its demo.json ({exc})."
            )
            raise typer.Exit(2) from None
        base_url = base_url or demo["base_url"]
        client_id = client_id or demo["consumer"]["client_id"]
        key = key or Path(demo["consumer"]["private_key_file"])
        kid, alg = demo["consumer"].get("kid"), demo["consumer"].get("alg")
    base = base_url.rstrip("/")
    try:
        private = _load_key(key, kid, alg)
        with httpx.Client(timeout=30) as http:
            token_url = http.get(f"{base}/.well-known/smart-configuration").json()["token_endpoint"]
            assertion = sign_assertion(private, client_id, token_url, end_user=json.loads(end_user))
            got = http.post(token_url, data=token_form(assertion, scope))
            if got.status_code != 200:
                errors.print(f"[red]Token refused ({got.status_code}):[/red] {got.text}")
                raise typer.Exit(1)
            headers = {
                "Authorization": f"Bearer {got.json()['access_token']}",
                "Accept": "application/fhir+json",
            }
            if wait_ms is not None:
                headers["X-Provider-Wait-Time"] = str(wait_ms)
            params: list[tuple[str, str | int | float | bool | None]] = [
                ("patient.identifier", f"{NHS}|{nhs_number}")
            ]
            params += [(n, v) for n, _, v in (p.partition("=") for p in param or [])]
            response = http.get(
                f"{base}/{resource_type}", params=httpx.QueryParams(params), headers=headers
            )
            bundles = []
            while True:
                body = response.json()
                if response.status_code != 200:
                    issues = body.get("issue", []) if isinstance(body, dict) else []
                    text = (
                        "; ".join(i.get("diagnostics", "") for i in issues) or response.text[:500]
                    )
                    errors.print(f"[red]The hub answered {response.status_code}:[/red] {text}")
                    raise typer.Exit(1)
                bundles.append(body)
                following = [
                    lk["url"] for lk in body.get("link", []) if lk.get("relation") == "next"
                ]
                if not following or len(bundles) >= pages:
                    break
                response = http.get(following[0], headers=headers)
    except (OSError, ValueError, KeyError, httpx.HTTPError) as exc:
        errors.print(f"[red]The query failed:[/red] {exc}")
        raise typer.Exit(1) from None
    _print(resource_type, nhs_number, bundles)


def _print(resource_type: str, nhs_number: str, bundles: list[dict[str, Any]]) -> None:
    table = Table(title=f"{resource_type} for NHS number {nhs_number}", title_justify="left")
    for column in ("provider", "id", "when", "what"):
        table.add_column(column)
    rows = 0
    notes: list[str] = []
    for bundle in bundles:
        for entry in bundle.get("entry", []):
            resource = entry.get("resource", {})
            if entry.get("search", {}).get("mode") == "outcome":
                for issue in resource.get("issue", []):
                    notes.append(
                        f"{issue.get('severity', 'warning')}: {issue.get('diagnostics', '')}"
                    )
                continue
            provider = str(resource.get("meta", {}).get("source", "")).rsplit("/", 1)[-1]
            when, what = _summary(resource)
            table.add_row(provider, str(resource.get("id", "")), when, what)
            rows += 1
    console.print(table)
    total = bundles[0].get("total") if bundles else None
    console.print(f"{rows} resources" + (f" (total {total})" if total is not None else ""))
    for note in notes:
        console.print(f"[yellow]![/yellow] {note}", highlight=False)
