"""The patient index: NHS numbers, demographic tracing against PDS, registrations and linkages.

Modules:

* :mod:`sharedcare.pix.nhs` — NHS number normalisation and Modulus 11 validation;
* :mod:`sharedcare.pix.tracing` — tracing demographics against a PDS-compatible FHIR
  endpoint, and its durable-queue integration;
* :mod:`sharedcare.pix.metrics` — Prometheus metrics of the index;
* :mod:`sharedcare.pix.registration` — a provider's registration parsed and checked;
* :mod:`sharedcare.pix.index` — :class:`PatientIndex`: people, linkages, merges, trace results;
* :mod:`sharedcare.pix.bulk` — NDJSON bulk load (COPY on PostgreSQL);
* :mod:`sharedcare.pix.queries` — ``$ihe-pix`` and ``$data-availability``;
* :mod:`sharedcare.pix.hub` — routes and lifespan (trace worker); :mod:`sharedcare.pix.cli` — ``sharedcare pix``.

Nothing is imported here, so ``import sharedcare.pix.nhs`` stays free of HTTP and database
dependencies (the simulators import it).
"""
