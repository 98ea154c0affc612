"""The participant registry: organisations, their systems, endpoints, keys and scopes.

Participants live in the regional store as ordinary FHIR resources, so they are
versioned, in the change log (backed up, replayable) and audited like everything else,
and can be managed through the FHIR API by a client holding ``sharedcare/admin``.

Mapping (base ``https://sharedcare.example.org/fhir``, written ``HUB`` below):

- **Organization** — the participant. ``identifier``: ``https://fhir.nhs.uk/Id/ods-organization-code``
  | ODS code; ``name``; ``active``. Created with id = the ODS code (or the client id when
  no ODS code is given) unless an Organization with that ODS identifier already exists,
  which is then reused.
- **Endpoint/{client_id}** — the system's registration, authoritative for identity:
  ``identifier`` ``HUB/Id/client-id`` | client id; ``status`` ``active`` | ``suspended``;
  ``connectionType`` ``HUB/CodeSystem/endpoint-connection-type#smart-backend-services``;
  ``name``; ``managingOrganization`` → the Organization; ``payloadType`` ``none``;
  ``address`` = the JWKS URL, or ``urn:sharedcare:client:{client_id}`` for a registered JWKS;
  extensions ``HUB/StructureDefinition/``: ``system-kind`` (valueCode provider | consumer |
  both), ``allowed-scopes`` (valueString, space-separated SMART scopes), ``environment``
  (valueString), ``identifier-system`` (valueUri, repeated: the patient identifier systems
  a provider owns), ``jwks`` (valueString: the registered public JWKS as JSON).
- **Endpoint/{client_id}.fhir** — a provider's FHIR API: ``connectionType`` ``hl7-fhir-rest``,
  ``address`` = FHIR base URL, ``payloadType`` ``any``.
- **Endpoint/{client_id}.msg** — the messaging endpoint: ``connectionType`` ``hl7-fhir-msg``.

All of a system's Endpoints carry its client-id identifier and managing organisation; the
registry suspends and re-activates them together. A system's status for authentication is
the status of ``Endpoint/{client_id}``. Client ids are 1-58 letters, digits or hyphens.
"""

from __future__ import annotations
