"""Synchronous federated query: fan-out to the providers that know the person, merge, deadline."""
