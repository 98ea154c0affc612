"""Identity and access: SMART Backend Services for the hub (REQUIREMENTS §3).

- ``routes``: ``POST /oauth2/token``, ``/.well-known/smart-configuration`` (also under
  ``/fhir``), ``GET /oauth2/jwks`` (the hub's public keys).
- ``assertion``: verification of client assertions (RS384/ES384, kid, jku, iss/sub/aud,
  exp ≤ 5 min, jti); ``jwks``: the clients' fetched key sets, cached per Cache-Control.
- ``replay``: the jti guard, and ``ratelimit``: per-client token buckets, both shared by
  all hub processes through the database (tables in ``schema``).
- ``hubkeys``: the hub's rotating signing keys, in the database; ``tokens``: the access
  tokens (JWTs, ≤ 300 s) and their cheap, cached verification.
- ``scopes``: SMART v1 (``system/Patient.read``) and v2 (``system/Patient.rs``) scopes and
  ``sharedcare/admin``; ``context``: :class:`~sharedcare.iam.context.AccessContext` and
  ``access(request)``; ``middleware``: the checks on every ``/fhir`` request.
- ``client``: the client side (key pairs, signed assertions) for the CLI, tests, benchmarks.

``service.Iam`` holds a process's collaborators; ``create_app`` builds and starts it.
"""

from __future__ import annotations
