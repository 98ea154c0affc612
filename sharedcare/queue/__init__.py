"""Durable queue and transactional outbox; worker loop; retry with backoff; dead letters."""
