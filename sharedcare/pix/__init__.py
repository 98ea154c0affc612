"""The patient index: NHS numbers, demographic tracing against PDS, registrations and linkages.

Modules:

* :mod:`sharedcare.pix.nhs` — NHS number normalisation and Modulus 11 validation;
* :mod:`sharedcare.pix.tracing` — tracing demographics against a PDS-compatible FHIR
  endpoint, and its durable-queue integration;
* :mod:`sharedcare.pix.metrics` — Prometheus metrics of the index.

Nothing is imported here, so ``import sharedcare.pix.nhs`` stays free of HTTP and database
dependencies (the simulators import it).
"""
